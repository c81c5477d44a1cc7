"""Run a job kind (prep, train, tune, export, serve) on a Ray cluster through Ray's Jobs API.

The job is `python launch/<kind>.py <overrides>` with this checkout as its working directory, so a
cluster runs exactly the code and configs of the submitting machine. Before the job is submitted,
the overrides are composed here (a misspelt key fails at once), and a small preflight job on the
cluster runs the launch script's own check where the cluster's files are, then has every node write
and read back the configured storage: a path that is not one place every node shares fails there,
in one line, instead of half-way through training.
"""
