"""Tools for developing lmforge itself (not used at run time)."""
