"""The local run: a G2RPOJob on this machine, no cluster (`g2rpo run FILE`)."""
