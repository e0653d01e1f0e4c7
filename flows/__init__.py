"""btx on Prefect: flows and tasks, each a thin wrapper over one btx_core stage, deployed by
infra/prefect.yaml.

Start at pipeline.py (the whole DAG). tasks.py holds a task per stage and options.py how they
persist results, retry and use the cores; expert.py, mix.py, finetune.py and compare.py are the
flows deployed on their own; local.py and remote.py run branches on this machine or on work
pools; progress.py and report.py make the artifacts the UI shows; automations.py crashes the
runs of a lost node.
"""
