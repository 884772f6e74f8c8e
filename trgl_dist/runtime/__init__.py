"""The distributed pipeline: topology, wire format, buffers, links and the rank's run."""
