"""cow: the FUSE copy-on-write overlay (pyfuse3 + trio).  Built in a later issue."""
