"""`esa study FILE.toml`: a grid of ordinary runs and the answer computed from their files.

spec     the study file: its cells (each a RunConfig), validated before anything runs
cells    one cell's state on disk and how to run it (fresh, resumed, skipped)
execute  the executors: in turn, N processes at once, or a Slurm array through submitit
answer   study.json from the cells' files alone: consistency, domains, scaling, architecture
page     study.html and its figures
"""
