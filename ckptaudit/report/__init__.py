"""Reports: HDF5 files (hdf5.py) and the terminal / JSON sink (console.py)."""
