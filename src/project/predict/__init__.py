"""Scoring files with an export: the data layer reads them, the standalone runtime scores them.

``project.predict.job`` is the predict job (``scripts/predict.py``): many ROOT or Parquet
files, one friend tree or Parquet output per input, in-process or on a Dask cluster.
``project.predict.cli`` is the single-file command ``python -m project.inference``. Nothing is
imported here, so that either one loads only what it uses.
"""
