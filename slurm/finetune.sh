#!/bin/bash
# Fine-tune VL-BERT (VQA, RefCOCO+, VCR) on a Slurm cluster: the pretraining launcher
# (slurm/pretrain.sh: one srun task per GPU, USR1 120 s before the time limit ->
# checkpoint, requeue, resume into the same MLflow run) with tools/finetune.py as the entry.
#
#   sbatch slurm/finetune.sh configs/vqa_base.yaml --set model.pretrained=runs/base/model.safetensors
#   sbatch --nodes=1 --time=12:00:00 slurm/finetune.sh configs/vqa_base.yaml --set optim.lr=1e-4
#   sbatch --nodes=2 slurm/finetune.sh configs/vcr_base.yaml --set model.pretrained=runs/base/model.safetensors
#
# Environment and options as for slurm/pretrain.sh (VLBERT_PYTHON, VLBERT_OUTPUT_DIR,
# MLFLOW_TRACKING_URI, VLBERT_ROOT, VLBERT_MASTER_PORT). The #SBATCH lines must live in the
# submitted script, hence this copy; `exec` keeps the batch shell's pid, which Slurm signals.
#
#SBATCH --job-name=vlbert-ft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --dependency=singleton
#SBATCH --signal=B:USR1@120

ROOT="${VLBERT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
export VLBERT_ENTRY=tools/finetune.py
exec bash "$ROOT/slurm/pretrain.sh" "$@"
