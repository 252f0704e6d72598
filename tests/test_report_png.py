"""Report figures: the one PNG writer draws text that is not valid UTF-8 (file names) instead of failing."""

from blindspot.report.png import new_figure, png_bytes, save_png


def test_a_non_utf8_file_name_in_a_title_is_drawn_escaped(tmp_path):
    name = b"knee_\xff.h5".decode("utf-8", "surrogateescape")  # as os.listdir returns such a name
    fig = new_figure(2, 2)
    ax = fig.subplots()
    ax.set_title(name)
    path = save_png(fig, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ax.get_title() == "knee_\\xff.h5"
    assert png_bytes(fig)[:4] == b"\x89PNG"
