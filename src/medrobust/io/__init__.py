"""Readers and writers: DICOM files, slides, Zarr stores, atomic outputs."""
