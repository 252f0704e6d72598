"""Acquisition physics: MRI under-sampling (:mod:`.mri`) and CT low-dose simulation (:mod:`.ct`)."""
