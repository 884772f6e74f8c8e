"""Before a run: what each module costs, and the layout of stages and replicas that runs fastest."""
