#!/bin/bash
# rank 0 of a --distributed run launched with env vars (as a scheduler would) where MASTER_PORT is busy
cd /tmp/probe_dist
export OMP_NUM_THREADS=1 EMBGEOM_DIST_BACKEND=gloo HF_HUB_OFFLINE=1 WORLD_SIZE=1 RANK=0 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$1
timeout 100 /work/main/.venv/bin/python -m embgeom pairs x157.npy --distributed --json busy_env.json
echo "rc=$?"
