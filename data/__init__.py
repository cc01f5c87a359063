"""Data shipped with ernie_lab (installed as the package ``ernie_lab._data``)."""
