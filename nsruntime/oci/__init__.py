"""The OCI runtime: runc's command line (`nsrun`) over nsruntime.

- ``spec``: an OCI bundle's config.json (runtime-spec 1.0-1.2) -> ContainerConfig, every refusal
  naming its JSON path.
- ``runtime``: the verbs (create, start, state, kill, delete, run, list) on a state root.
- ``cli``: `nsrun`'s parser, its log (text or JSON lines) and its exit statuses.
- ``hooks``: running the spec's hooks with the state on stdin and their timeouts.

docs/oci.md says what of the spec works, what is refused, and how podman and containerd call it.
"""
