"""The seed paper's published numbers, in one place, for the reports to show beside what blindspot measures.

Source: K. Cheng, F. Calivà, R. Shah, M. Han, S. Majumdar, V. Pedoia, "Addressing the false negative problem of deep
learning MRI reconstruction models by adversarial attacks and robust training", MIDL 2020 (PMLR vol. 121); the
project's copy is ``shared/seeds/000_c20f16574ca88134.txt`` (Tables 1 and 2, the IP table, the transfer rate and the
real-abnormalities table). fastMRI single-coil knee, 320×320, random masks at 4× (centre fraction 0.08) and 8×
(0.04); the attack rates are under the seed's own criterion (``L_atk`` ≥ 1e-3, IP loss > 1e-4), RS with 11
candidates and FD. The seed has no CT numbers (the CT source document reconstructs invariances, not attack rates).

Rows are keyed by the bundled demo networks' labels (:data:`blindspot.runs.audit.BUNDLED`), which are the seed's.
"""

from __future__ import annotations

from typing import Mapping

#: Short citation used in captions and table headers.
SEED_CITATION = "Cheng, Calivà et al., MIDL 2020"
#: What the seed's numbers were measured on, for captions.
SEED_SETTING = "fastMRI single-coil knee, 320×320, the seed's criterion"

#: Table 1: ``(model, acceleration) → {"ssim": (mean, std), "nmse": (mean, std)}``.
SEED_TABLE1: dict[tuple[str, float], dict[str, tuple[float, float]]] = {
    ("U-Net", 4.0): {"ssim": (0.7213, 0.2621), "nmse": (0.03455, 0.05011)},
    ("I-RIM", 4.0): {"ssim": (0.7501, 0.2546), "nmse": (0.03413, 0.05800)},
    ("FNAF-robust U-Net", 4.0): {"ssim": (0.7197, 0.2613), "nmse": (0.03489, 0.05008)},
    ("U-Net", 8.0): {"ssim": (0.6548, 0.2942), "nmse": (0.04935, 0.04962)},
    ("I-RIM", 8.0): {"ssim": (0.6916, 0.2941), "nmse": (0.04438, 0.06830)},
    ("FNAF-robust U-Net", 8.0): {"ssim": (0.6533, 0.2924), "nmse": (0.04962, 0.05670)},
}

#: Table 2: ``(model, acceleration) → {search: (attack rate as a fraction, mean attack loss "MSE")}``.
SEED_TABLE2: dict[tuple[str, float], dict[str, tuple[float, float]]] = {
    ("U-Net", 4.0): {"rs": (0.8444, 0.001530), "fd": (0.7217, 0.001386)},
    ("I-RIM", 4.0): {"rs": (0.4449, 0.001164), "fd": (0.3460, 0.001080)},
    ("FNAF-robust U-Net", 4.0): {"rs": (0.1271, 0.000483), "fd": (0.1048, 0.000466)},
    ("U-Net", 8.0): {"rs": (0.8600, 0.001592), "fd": (0.7484, 0.001457)},
    ("I-RIM", 8.0): {"rs": (0.7739, 0.001470), "fd": (0.6388, 0.001349)},
    ("FNAF-robust U-Net", 8.0): {"rs": (0.1509, 0.000534), "fd": (0.1330, 0.000467)},
}

#: The IP table (features of each search, both accelerations): ``name → (acceptance as a fraction, mean IP loss)``.
SEED_IP: dict[str, tuple[float, float]] = {
    "Random": (0.9982, 0.00064), "U-Net": (0.9972, 0.00050), "I-RIM": (0.9976, 0.00051),
    "FNAF-robust U-Net": (0.9934, 0.00052),
}

#: Transferability: the U-Net's FNAF examples applied to I-RIM.
SEED_TRANSFER: dict[tuple[str, str], float] = {("U-Net", "I-RIM"): 0.8948}

#: Real abnormalities: ``model → {lesion kind: (preserved, total)}``.
SEED_LESIONS: dict[str, dict[str, tuple[int, int]]] = {
    "U-Net": {"cartilage": (1, 8), "meniscus": (8, 9)},
    "FNAF-robust U-Net": {"cartilage": (3, 8), "meniscus": (9, 9)},
}


def seed_table1(model: str, acceleration: float, modality: str = "mri") -> Mapping[str, tuple[float, float]] | None:
    """The seed's Table 1 row of ``model`` at ``acceleration`` (MRI), or ``None`` when the seed has none."""
    return SEED_TABLE1.get((model, float(acceleration))) if modality == "mri" else None


def seed_table2(model: str, acceleration: float, modality: str = "mri") -> Mapping[str, tuple[float, float]] | None:
    """The seed's Table 2 row of ``model`` at ``acceleration`` (MRI): ``{search: (rate, MSE)}``, or ``None``."""
    return SEED_TABLE2.get((model, float(acceleration))) if modality == "mri" else None
