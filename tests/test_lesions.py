"""Lesion boxes: reading and validating annotations, planting lesions in phantoms, scoring their preservation."""

from __future__ import annotations

import csv
import json
import re

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blindspot.cli import main
from blindspot.data import knee_phantom as kp
from blindspot.data.fastmri import FastMRISliceDataset
from blindspot.data.knee_files import write_phantom_volumes
from blindspot.data.lesion_phantom import plant_lesions, write_lesion_phantoms
from blindspot.data.lesions import (
    LesionBox,
    boxes_tensor,
    read_annotations,
    validate_annotations,
    write_annotations,
)
from blindspot.errors import BlindspotError
from blindspot.runs.lesions import PreservationRule, preservation_table, score_lesions
from blindspot.models.checkpoint import save_checkpoint
from blindspot.models.registry import build_model

SIZE = (64, 64)


@pytest.fixture(scope="module")
def lesion_data(tmp_path_factory):
    """Two 64×64 single-coil volumes of 4 slices with 3 planted lesions each, written as fastMRI files + CSV."""
    root = tmp_path_factory.mktemp("lesion_data")
    paths, boxes = write_lesion_phantoms(root / "data", root / "boxes.csv", volumes=2, slices=4,
                                         lesions_per_volume=3, seed=0, lesion_seed=0, shape=SIZE, recon_size=SIZE,
                                         progress=False)
    return root, paths, boxes


def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma)
    k = torch.arange(-r, r + 1, dtype=x.dtype)
    g = torch.exp(-k**2 / (2 * sigma**2))
    g = g / g.sum()
    return F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), (g[:, None] * g[None, :])[None, None])


def test_planted_lesions_read_back_with_their_boxes(lesion_data):
    root, paths, boxes = lesion_data
    assert len(boxes) >= 4 and {b.label for b in boxes} <= {"cartilage", "meniscus", "bone marrow"}
    ann = read_annotations(root / "boxes.csv")
    assert [b.as_row() for b in ann.boxes] == [b.as_row() for b in boxes]
    ds = FastMRISliceDataset(root / "data", progress=False)
    checked = validate_annotations(ann, {v.fname: (v.num_slices, v.crop) for v in ds.volumes})
    assert [b.as_row() for b in checked] == [b.as_row() for b in boxes]
    # The lesion files differ from the plain phantoms exactly around the boxes: on every slice with lesions, the
    # largest change of the stored reconstruction lies inside one of that slice's boxes.
    for path in paths:
        with h5py.File(path, "r") as hf:
            rec = torch.from_numpy(np.asarray(hf["reconstruction_esc"]))
            seed = int(hf.attrs["phantom_seed"])
        plain = kp.reconstruction_from_kspace(kp.generate_knee_volume(seed, 4, SIZE, SIZE).kspace(), SIZE)
        diff = (rec - plain).abs()
        mine = [b for b in boxes if b.file == path.name]
        for s in range(4):
            on_slice = [b for b in mine if b.slice == s]
            if not on_slice:
                assert float(diff[s].max()) < 1e-4
                continue
            r, c = divmod(int(diff[s].argmax()), SIZE[1])
            assert any(b.y <= r < b.y + b.height and b.x <= c < b.x + b.width for b in on_slice)


def test_identity_keeps_every_lesion_blur_and_removal_lose_them(lesion_data):
    root, paths, boxes = lesion_data
    ds = FastMRISliceDataset(root / "data", progress=False)
    index = {(ds.volumes[v].fname, s): i for i, (v, s) in enumerate(ds.samples)}
    truth = torch.stack([ds[index[(b.file, b.slice)]].target for b in boxes])  # (L, 1, h, w)
    bt = boxes_tensor(boxes)
    dr = torch.full((len(boxes),), float(truth.max()))
    same = score_lesions(truth, truth.clone(), bt, dr)
    assert same["preserved"].all() and torch.allclose(same["kept"], torch.ones(len(boxes), dtype=torch.float64))
    assert torch.allclose(same["ssim_box"], torch.ones(len(boxes), dtype=torch.float64))
    blurred = score_lesions(truth, _gauss_blur(truth, 3.0), bt, dr)
    small = torch.tensor([max(b.width, b.height) <= 5 for b in boxes])
    assert small.any() and not blurred["preserved"][small].any()
    # The same slices without the lesions (the plain phantoms) lose every lesion, by construction.
    plain = {}
    for path in paths:
        with h5py.File(path, "r") as hf:
            seed = int(hf.attrs["phantom_seed"])
        plain[path.name] = kp.reconstruction_from_kspace(kp.generate_knee_volume(seed, 4, SIZE, SIZE).kspace(), SIZE)
    without = torch.stack([plain[b.file][b.slice][None] for b in boxes])
    gone = score_lesions(truth, without, bt, dr)
    assert not gone["preserved"].any() and (gone["kept"] <= 0.25 + 1e-9).all()


def test_score_known_answers():
    truth = torch.full((1, 1, 32, 32), 1.0)
    truth[..., 10:14, 12:16] = 3.0  # a 4×4 lesion of contrast 2 on a flat background
    box = torch.tensor([[12, 10, 4, 4]])
    dr = torch.tensor([3.0])
    offset = score_lesions(truth, truth + 0.7, box, dr)  # a shift of the whole neighbourhood is forgiven
    assert offset["kept"].item() == pytest.approx(1.0) and offset["contrast_recon"].item() == pytest.approx(2.0)
    half = truth.clone()
    half[..., 10:14, 12:16] = 2.0  # half the contrast: kept = 1 − (1/2)² = 0.75
    s = score_lesions(truth, half, box, dr)
    assert s["kept"].item() == pytest.approx(0.75) and bool(s["preserved"])
    assert s["contrast_truth"].item() == pytest.approx(2.0) and s["contrast_recon"].item() == pytest.approx(1.0)
    assert s["nmse_box"].item() == pytest.approx(1 / 9)
    assert s["psnr_box"].item() == pytest.approx(10 * np.log10(9.0))
    assert not bool(score_lesions(truth, half, box, dr, PreservationRule(threshold=0.8))["preserved"])
    flat = score_lesions(truth, torch.ones_like(truth), box, dr)
    assert flat["kept"].item() == pytest.approx(0.0) and not bool(flat["preserved"])
    rows = [{"model": "m", "label": "a", "preserved": True}, {"model": "m", "label": "a", "preserved": False},
            {"model": "m", "label": "b", "preserved": True}]
    assert preservation_table(rows) == {"m": {"a": (1, 2), "b": (1, 1), "all": (2, 3)}}


def test_tissue_maps_and_receive_field_match_the_generator():
    from blindspot.data.lesion_phantom import receive_field, tissue_maps

    vol = kp.generate_knee_volume(1, 3, (64, 64), (64, 64), num_coils=2, return_sensitivities=True)
    assert torch.allclose(receive_field(vol), vol.sensitivities, atol=1e-6)
    single = kp.generate_knee_volume(1, 3, (64, 64), (64, 64))
    maps = tissue_maps(single, ["meniscus", "marrow"])
    anatomy = (single.image / receive_field(single)).abs()  # anatomy + noise / shading
    c = single.params.contrast
    for t, (name, value) in enumerate((("meniscus", c.meniscus), ("marrow", c.marrow))):
        full = maps[t] > 0.95
        assert int(full.sum()) > 5, name
        # Where a tissue fills the pixel, the image shows that tissue's signal (texture ±10%, noise ≈ 0.04).
        assert abs(float(anatomy[full].median()) - value) < 0.1 * value + 0.03, name


def test_plant_lesions_is_seeded_and_multicoil_works():
    vol = kp.generate_knee_volume(2, 3, (48, 48), (48, 48), num_coils=3)
    a_img, a = plant_lesions(vol, 3, seed=5)
    b_img, b = plant_lesions(vol, 3, seed=5)
    assert torch.equal(a_img, b_img) and [x.box for x in a] == [x.box for x in b] and a
    assert a_img.shape == vol.image.shape and not torch.equal(a_img, vol.image)
    with pytest.raises(BlindspotError, match="unknown lesion kind"):
        plant_lesions(vol, 1, kinds=["tumour"])


def test_lesion_phantoms_without_lesions_are_the_plain_phantoms(tmp_path):
    shape, recon = (48, 40), (40, 40)
    paths, boxes = write_lesion_phantoms(tmp_path / "lesions", tmp_path / "boxes.csv", volumes=1, slices=3,
                                         lesions_per_volume=0, shape=shape, recon_size=recon, progress=False)
    (plain,) = write_phantom_volumes(tmp_path / "plain", 1, 3, shape=shape, recon_size=recon, progress=False)
    assert boxes == []
    with h5py.File(paths[0], "r") as a, h5py.File(plain, "r") as b:
        for key in ("kspace", "reconstruction_esc", "ismrmrd_header"):
            assert np.array_equal(a[key][()], b[key][()]), key
        assert {k: b.attrs[k] for k in b.attrs} == {k: a.attrs[k] for k in b.attrs}
    # With lesions, only the slices that got one change.
    vol = kp.generate_knee_volume(0, 3, shape, recon)
    image, lesions = plant_lesions(vol, 1, seed=3)
    untouched = [s for s in range(3) if s not in {lesion.slice for lesion in lesions}]
    assert len(untouched) == 2 and torch.equal(image[untouched], vol.image[untouched])


VOLS = {"file_a": (4, (64, 64))}


def _csv(tmp_path, text: str):
    p = tmp_path / "boxes.csv"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "body, problem",
    [
        ("file_a,1,2,3,4,5\n", "row 2: fewer fields"),
        ("file_a,1,2,3,4,5,meniscus,extra\n", "row 2: more fields"),
        ("file_a,1,x,3,4,5,meniscus\n", "row 2: x must be a whole number"),
        ("file_a,1,2.5,3,4,5,meniscus\n", "row 2: x must be a whole number"),
        ("file_a,1,2,,4,5,meniscus\n", "row 2: y is empty"),
        ("file_a,1,-2,3,4,5,meniscus\n", "row 2: box corner"),
        ("file_a,1,2,3,0,5,meniscus\n", "row 2: box must be at least 1x1"),
        ("file_a,1,2,3,4,5,\n", "row 2: label is empty"),
        ("file_a,-1,2,3,4,5,meniscus\n", "row 2: slice must be >= 0"),
    ],
)
def test_malformed_rows_name_the_row(tmp_path, body, problem):
    path = _csv(tmp_path, "file,slice,x,y,width,height,label\n" + body)
    with pytest.raises(BlindspotError) as err:
        read_annotations(path)
    assert problem in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "row, problem",
    [
        ("file_b.h5,1,2,3,4,5,meniscus", "row 3: unknown file 'file_b.h5'"),
        ("file_a.h5,4,2,3,4,5,meniscus", "row 3: slice 4 is out of range for file_a.h5 (4 slices)"),
        ("file_a,1,60,3,5,5,meniscus", "row 3: box x=60, y=3, width=5, height=5 leaves the 64x64 image"),
        ("file_a,1,2,62,4,5,meniscus", "leaves the 64x64 image"),
    ],
)
def test_rows_are_checked_against_the_volumes(tmp_path, row, problem):
    path = _csv(tmp_path, "file,slice,x,y,width,height,label\nfile_a.h5,0,1,1,2,2,cartilage\n" + row + "\n")
    ann = read_annotations(path)
    with pytest.raises(BlindspotError) as err:
        validate_annotations(ann, VOLS)
    assert problem in str(err.value)


def test_header_json_study_level_and_origin(tmp_path):
    with pytest.raises(BlindspotError, match="header lacks column.*label"):
        read_annotations(_csv(tmp_path, "file,slice,x,y,width,height\nfile_a,1,2,3,4,5\n"))
    # fastMRI+ style: extra study_level column; a study-level row has no box.
    ann = read_annotations(_csv(tmp_path, "file,slice,study_level,x,y,width,height,label\n"
                                          "file_a,,Yes,,,,,Meniscus Tear\nfile_a,2,No,10,50,4,6,Meniscus Tear\n"))
    assert ann.study_level == 1 and len(ann.boxes) == 1
    bottom = validate_annotations(ann, VOLS, origin="bottom")[0]
    assert (bottom.x, bottom.y, bottom.width, bottom.height) == (10, 64 - 50 - 6, 4, 6)
    boxes = [LesionBox("file_a", 1, 2, 3, 4, 5, "cartilage"), LesionBox("file_a", 3, 0, 0, 1, 1, "bone marrow")]
    write_annotations(tmp_path / "b.json", boxes)
    back = read_annotations(tmp_path / "b.json").boxes
    assert [b.as_row() for b in back] == [b.as_row() for b in boxes]
    (tmp_path / "bad.json").write_text(json.dumps({"lesions": [{"file": "file_a", "slice": 1}]}))
    with pytest.raises(BlindspotError, match=r"row 1: missing x, y, width, height, label"):
        read_annotations(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{oops")
    with pytest.raises(BlindspotError, match="not valid JSON"):
        read_annotations(tmp_path / "broken.json")


def test_cli_end_to_end(lesion_data, tmp_path, capsys):
    root, _, boxes = lesion_data
    hp = {"chans": 4, "num_pool_layers": 2}
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "unet.pt", build_model("unet", **hp), "unet", hp,
                           physics={"modality": "mri", "mask_type": "random"})
    out = tmp_path / "run"
    rc = main(["lesions", "--model", str(ckpt), "--data", str(root / "data"), "--boxes", str(root / "boxes.csv"),
               "--out", str(out), "--device", "cpu", "--max-figures", "2", "--no-progress"])
    assert rc == 0
    table = json.loads((out / "table.json").read_text())
    assert set(table["preserved"]) == {"Zero-filled", "U-Net"}
    assert table["preserved"]["U-Net"]["all"]["total"] == len(boxes)
    lines = (out / "lesions.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 2 * len(boxes)
    assert len(list((out / "figures").glob("*.png"))) == 2
    cell = table["preserved"]["U-Net"]["all"]
    assert "| U-Net |" in (out / "table.md").read_text()
    assert f"{cell['preserved']}/{cell['total']} |" in (out / "table.md").read_text()
    # A bad row is a one-line error and exit code 2, never a traceback.
    bad = tmp_path / "bad.csv"
    bad.write_text("file,slice,x,y,width,height,label\nfile_phantom_000000.h5,9,1,1,2,2,meniscus\n")
    rc = main(["lesions", "--model", "zero-filled", "--data", str(root / "data"), "--boxes", str(bad),
               "--out", str(tmp_path / "run2"), "--no-progress"])
    assert rc == 2
    assert "row 2: slice 9 is out of range" in capsys.readouterr().err


def test_cli_lesion_phantoms(tmp_path):
    rc = main(["data", "lesion-phantoms", "--out", str(tmp_path / "d"), "--boxes", str(tmp_path / "d" / "b.csv"),
               "--volumes", "1", "--slices", "2", "--shape", "32", "32", "--recon-size", "32", "32"])
    assert rc == 2  # the boxes file may not sit among the .h5 files
    rc = main(["data", "lesion-phantoms", "--out", str(tmp_path / "d"), "--boxes", str(tmp_path / "b.json"),
               "--volumes", "1", "--slices", "3", "--lesions", "2", "--shape", "48", "48", "--recon-size", "48", "48"])
    assert rc == 0
    ann = read_annotations(tmp_path / "b.json")
    assert 1 <= len(ann.boxes) <= 2 and all(b.file == "file_phantom_000000.h5" for b in ann.boxes)
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["file_phantom_000000.h5"]


def test_box_weighted_loss_counts_boxes_w_times():
    from blindspot.data.sample import KspaceTransform, collate_mri
    from blindspot.physics.mri import create_mask_func, fft2c
    from blindspot.training.lesion_weighted import box_weight_map, box_weighted_loss
    from blindspot.training.mri import mri_loss

    wmap = box_weight_map(torch.tensor([[1, 2, 3, 1], [0, 0, 1, 1]]), (4, 5), 5.0)
    expect = torch.ones(4, 5)
    expect[2, 1:4] = 5.0
    expect[0, 0] = 5.0
    assert torch.equal(wmap, expect)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 1, 16, 16, generator=g, dtype=torch.float32).to(torch.complex64)
    tf = KspaceTransform(create_mask_func("random", [4.0]))
    batch = collate_mri([tf(fft2c(images[i]), None, "vol.h5", i) for i in range(2)])
    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    box = LesionBox("vol", 1, 2, 3, 4, 5, "meniscus")
    plain, _ = mri_loss("l1")(model, batch, None)
    same, _ = box_weighted_loss("l1", [box], 1.0)(model, batch, None)
    assert torch.allclose(plain, same)
    weighted, extra = box_weighted_loss("l1", [box], 7.0)(model, batch, None)
    x, y = batch.normalized()
    err = (model(x) - y).abs()
    inside = err[1, 0, 3:8, 2:6].sum()
    assert torch.allclose(weighted, (err.sum() + 6.0 * inside) / err.numel())
    assert torch.allclose(extra["l1_boxes"], err[1, 0, 3:8, 2:6].mean())
    with pytest.raises(BlindspotError, match="box weighting supports"):
        box_weighted_loss("ssim", [box], 2.0)


def test_train_mri_with_boxes(lesion_data, tmp_path):
    root, _, _ = lesion_data
    rc = main(["train", "mri", "--data", str(root / "data"), "--boxes", str(root / "boxes.csv"), "--box-weight", "5",
               "--hparam", "chans=4", "--hparam", "num_pool_layers=1", "--epochs", "1", "--batch-size", "2",
               "--val-fraction", "0.5", "--accelerations", "4", "--device", "cpu", "--out", str(tmp_path / "t"),
               "--no-progress"])
    assert rc == 0
    assert any((tmp_path / "t").glob("*.pt"))
    rc = main(["train", "mri", "--boxes", str(root / "boxes.csv"), "--epochs", "1", "--out", str(tmp_path / "u")])
    assert rc == 2  # boxes name files: --data is needed


def test_audit_lesion_section_matches_blindspot_lesions(lesion_data, tmp_path, capsys):
    """``audit --boxes`` adds the lesion section; its counts are ``blindspot lesions``' on the same data and masks."""
    root, _, boxes = lesion_data
    hp = {"chans": 4, "num_pool_layers": 2}
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "unet.pt", build_model("unet", **hp), "unet", hp,
                           physics={"modality": "mri", "mask_type": "random"})
    data, csv_path = str(root / "data"), str(root / "boxes.csv")
    run = tmp_path / "audit"
    rc = main(["audit", "--model", str(ckpt), "--names", "Tiny U-Net", "--data", data, "--boxes", csv_path,
               "--lesion-figures", "2", "--search", "rs", "--candidates", "2", "--criteria", "recovery",
               "--no-transfer", "--accelerations", "4", "--limit", "2", "--out", str(run), "--device", "cpu"])
    assert rc == 0
    section = json.loads((run / "results.json").read_text())["lesions"]
    rc = main(["lesions", "--model", str(ckpt), "--names", "Tiny U-Net", "--data", data, "--boxes", csv_path,
               "--acceleration", "4", "--max-figures", "0", "--out", str(tmp_path / "lesions"), "--device", "cpu",
               "--no-progress"])
    assert rc == 0
    alone = json.loads((tmp_path / "lesions" / "table.json").read_text())
    per = section["by_acceleration"]["4x"]
    assert per["preserved"] == alone["preserved"]  # every lesion of the data, whatever --limit
    assert set(per["preserved"]) == {"Zero-filled", "Tiny U-Net"}
    for label in {b.label for b in boxes}:
        assert per["preserved"]["Tiny U-Net"][label]["total"] == sum(b.label == label for b in boxes)
    assert section["lesions"] == len(boxes) and section["rule"]["threshold"] == 0.5
    # lesions.csv beside results.json: the same per-lesion scores as blindspot lesions' own file
    with open(run / "lesions.csv", newline="") as f:
        audit_rows = list(csv.DictReader(f))
    with open(tmp_path / "lesions" / "lesions.csv", newline="") as f:
        own_rows = list(csv.DictReader(f))
    assert [r["acceleration"] for r in audit_rows] == ["4.0"] * len(own_rows)
    assert [(r["model"], r["file"], r["slice"], r["kept"], r["preserved"]) for r in audit_rows] == \
        [(r["model"], r["file"], r["slice"], r["kept"], r["preserved"]) for r in own_rows]
    page = (run / "report.html").read_text()
    lesions_html = page[page.index("<h2>Lesions</h2>"): page.index("<h2>Run</h2>")]
    assert "Preservation rule" in lesions_html and "≥ 0.5" in lesions_html
    cell = per["preserved"]["Tiny U-Net"]["all"]
    assert "<td>Tiny U-Net</td>" in lesions_html and f"<td>{cell['preserved']}/{cell['total']}</td>" in lesions_html
    assert len(re.findall(r"<img alt='4×: [^']*' src='data:image/png;base64,", lesions_html)) == 2
    assert "## Lesions" in (run / "tables.md").read_text()
    capsys.readouterr()
    # Boxes that do not match the data: the reader's one-line error, exit 2, before anything is audited.
    bad = tmp_path / "bad.csv"
    bad.write_text("file,slice,x,y,width,height,label\nfile_phantom_000000.h5,9,1,1,2,2,meniscus\n")
    rc = main(["audit", "--model", str(ckpt), "--data", data, "--boxes", str(bad), "--search", "rs",
               "--no-transfer", "--accelerations", "4", "--out", str(tmp_path / "bad_run"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "row 2: slice 9 is out of range" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "bad_run" / "records.jsonl").exists()
    rc = main(["audit", "--model", str(ckpt), "--boxes", csv_path, "--out", str(tmp_path / "no_data")])
    err = capsys.readouterr().err
    assert rc == 2 and "--boxes needs --data" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------
# The seed authors' annotation CSV (filename, slice, numBBs, labels, coords on the row-flipped image)
# ----------------------------------------------------------------------------------------------------------------
AUTHOR_HEADER = "filename,slice,numBBs,labels,coords\n"


def _author_csv(boxes, h: int, label_of=lambda b: "Lat_Men") -> str:
    """The boxes (rows from the top, 0-based slices) as the authors write them, built here independently of the
    reader: 1-based slices, ``[xmin xmax ymin ymax]`` with rows counted on the upside-down image, fractional
    coordinates inside the boxes' pixels (the reader takes every pixel a box overlaps), one row per slice."""
    per: dict = {}
    for b in boxes:
        per.setdefault((b.file.removesuffix(".h5"), b.slice), []).append(b)
    lines = [AUTHOR_HEADER]
    for (file, s), group in per.items():
        coords = np.array([[b.x + 0.25, b.x + b.width - 0.4, h - b.y - b.height + 0.1, h - b.y - 0.3]
                           for b in group])
        labels = np.array([label_of(b) for b in group])
        lines.append(f'{file},{s + 1},{len(group)},{labels},"{coords}"\n')
    return "".join(lines)


def test_author_csv_gives_the_same_preserved_total_as_fastmri_plus(lesion_data, tmp_path):
    root, paths, boxes = lesion_data
    to_author = {"cartilage": "CartMedFem", "meniscus": "Lat_Men", "bone marrow": "BML_Med_Tib"}
    text = _author_csv(boxes, SIZE[0], lambda b: to_author[b.label])
    assert "\n [" in text  # a slice with two boxes: NumPy prints them on two lines of one quoted field
    (tmp_path / "authors.csv").write_text(text)
    ann = read_annotations(tmp_path / "authors.csv")
    assert ann.layout == "authors" and ann.origin == "bottom"
    # Oracle for the flip: on the authors' own reading (np.flip(reconstruction_esc, axis=1)), the largest change the
    # planted lesions make on each slice lies inside one of that slice's boxes, in the file's continuous coordinates.
    for path in paths:
        with h5py.File(path, "r") as hf:
            flipped = np.flip(np.asarray(hf["reconstruction_esc"]), axis=1)
            seed = int(hf.attrs["phantom_seed"])
        plain = np.flip(kp.reconstruction_from_kspace(kp.generate_knee_volume(seed, 4, SIZE, SIZE).kspace(),
                                                      SIZE).numpy(), axis=1)
        for b in {(a.file, a.slice) for a in ann.boxes if a.file == path.stem}:
            r, c = divmod(int(np.abs(flipped[b[1]] - plain[b[1]]).argmax()), SIZE[1])
            on = [a for a in ann.boxes if (a.file, a.slice) == b]
            assert any(a.y <= r < a.y + a.height and a.x <= c < a.x + a.width for a in on)
    ds = FastMRISliceDataset(root / "data", progress=False)
    checked = validate_annotations(ann, {v.fname: (v.num_slices, v.crop) for v in ds.volumes})  # origin ignored
    key = lambda b: (b.file.removesuffix(".h5"), b.slice, b.x, b.y, b.width, b.height)  # noqa: E731
    assert sorted(map(key, checked)) == sorted(map(key, boxes))
    # blindspot lesions on both files: the same preserved / total, label by label (labels renamed 1:1)
    tables = {}
    for name, csv_path in (("plus", root / "boxes.csv"), ("authors", tmp_path / "authors.csv")):
        rc = main(["lesions", "--model", "zero-filled", "--data", str(root / "data"), "--boxes", str(csv_path),
                   "--out", str(tmp_path / name), "--max-figures", "0", "--no-progress"])
        assert rc == 0
        tables[name] = json.loads((tmp_path / name / "table.json").read_text())["preserved"]["Zero-filled"]
    assert tables["authors"]["all"] == tables["plus"]["all"] and tables["plus"]["all"]["total"] == len(boxes)
    for label, author_label in to_author.items():
        if label in tables["plus"]:
            assert tables["authors"][author_label] == tables["plus"][label]
    # write_annotations(heights=...) writes the same layout back
    from blindspot.data.lesions import write_annotations as write

    write(tmp_path / "again.csv", checked, heights={"file_phantom_000000": 64, "file_phantom_000001": 64})
    again = validate_annotations(read_annotations(tmp_path / "again.csv"),
                                 {v.fname: (v.num_slices, v.crop) for v in ds.volumes})
    assert sorted(map(key, again)) == sorted(map(key, boxes))


def test_author_csv_known_box_and_pandas_index(tmp_path):
    # pandas' index column is ignored; one box [10.5 14.2 50 56] on the upside-down 64-row image of slice 3 covers
    # columns 10..14 and flipped rows 50..55, i.e. blindspot's rows 8..13 of slice index 2
    path = _csv(tmp_path, ",filename,slice,numBBs,labels,coords\n"
                          "0,file_a,3,1,['Cyst'],[[10.5  14.2  50.   56.  ]]\n")
    (box,) = validate_annotations(read_annotations(path), VOLS, origin="top")
    assert (box.file, box.slice, box.x, box.width, box.y, box.height, box.label) == ("file_a", 2, 10, 5, 8, 6, "Cyst")


@pytest.mark.parametrize(
    "body, problem",
    [
        ("file_a,0,1,['Cyst'],[[1 2 3 4]]\n", "row 2: slice must be >= 1"),
        ("file_a,1,2,['Cyst'],[[1 2 3 4]]\n", "row 2: numBBs is 2 but the row has 1 label(s) and 1 box(es)"),
        ("file_a,1,1,['Tumour'],[[1 2 3 4]]\n", "row 2: unknown label 'Tumour'"),
        ("file_a,1,1,['Cyst'],[[1 2 3]]\n", "row 2: coords box [1 2 3] must be four finite numbers"),
        ("file_a,1,1,['Cyst'],[[1 2 3 x]]\n", "row 2: coords box [1 2 3 x] holds a value that is not a number"),
        ("file_a,1,1,['Cyst'],1 2 3 4\n", "row 2: coords '1 2 3 4' is not a list"),
        ("file_a,1,1,['Cyst'],[[5 2 3 4]]\n", "row 2: box [5 2 3 4] is empty"),
        ("file_a,1,1,['Cyst'],[[-1 2 3 4]]\n", "row 2: box [-1 2 3 4] is outside the image"),
        ("file_a,1,1,['Cyst'],\n", "row 2: coords is empty"),
        ('file_a,1,2,[\'Cyst\' \'Med_Men\'],"[[1 2 3 4]\n [5 6 7 8]]"\nfile_a,2,1,[\'Cyst\'],[[1 2 3]]\n',
         "row 4: coords box"),  # the line the row starts on, after a two-line row
    ],
)
def test_author_csv_malformed_rows_name_the_row(tmp_path, body, problem):
    path = _csv(tmp_path, AUTHOR_HEADER + body)
    with pytest.raises(BlindspotError) as err:
        read_annotations(path)
    assert problem in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_author_csv_box_leaving_the_image_and_cli_error(lesion_data, tmp_path, capsys):
    root, _, _ = lesion_data
    path = _csv(tmp_path, AUTHOR_HEADER + "file_phantom_000000,1,1,['Cyst'],[[60.5 66 1 3]]\n")
    rc = main(["lesions", "--model", "zero-filled", "--data", str(root / "data"), "--boxes", str(path),
               "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "row 2: box" in err and "leaves the 64x64 image" in err and len(err.strip().splitlines()) == 1
