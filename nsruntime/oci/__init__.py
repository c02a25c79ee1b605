"""nsrun, the OCI runtime command line (runc's dialect) on top of nsruntime: spec, lifecycle, hooks."""
