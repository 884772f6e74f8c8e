"""Records of a run: the client, the coordinator, the run log, the summary and the report.

Nothing here imports torch: the coordinator process stays light.
"""
