#!/bin/bash
# HT-GRPO on several nodes with torchrun (no SLURM). Run this on every node with the same NNODES, MASTER_ADDR and
# RUN_ID, and that node's NODE_RANK (0 .. NNODES-1):
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 RUN_ID=mmada-fsdp-1 bash experiments/launch/torchrun_multinode.sh \
#         experiment=mmada_ht trainer=fsdp
# torchrun starts GPUS_PER_NODE processes per node; Lightning's TorchElasticEnvironment reads RANK / LOCAL_RANK /
# WORLD_SIZE / GROUP_RANK from it. trainer= must be a multi-GPU one (ddp, fsdp, deepspeed_zero2, deepspeed_zero3).
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}" "${RUN_ID:?set RUN_ID}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
export HTGRPO_RUN_ID="${RUN_ID}"   # all ranks of all nodes write to logs/<task>/runs/<RUN_ID>

torchrun --nnodes="${NNODES}" --node-rank="${NODE_RANK}" --nproc-per-node="${GPUS_PER_NODE}" \
    --master-addr="${MASTER_ADDR}" --master-port="${MASTER_PORT:-29500}" \
    -m htgrpo.fit trainer.num_nodes="${NNODES}" trainer.devices="${GPUS_PER_NODE}" "$@"
