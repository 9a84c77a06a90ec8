"""``distnet train`` and its jobs: the job file's schema and its reference (jobspec, jobhelp,
jobsdoc, jobfile, jobtoml), the command's arguments, the run of one job on any engine (job,
stages, rayjob, datacheck, runguard, console, observe), what a job's model and stages are
made of (cnnspec, codes), and the programs built on jobs (demo, conformance, convfeatures).
"""
