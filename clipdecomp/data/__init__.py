"""The data layer: image sources, the Zarr store, the data-set runner, Dask, the
ImageNet-segmentation benchmark and text pools. Imports the engine and the methods.
"""
