#!/bin/bash
#SBATCH --job-name=xffl_federation.train_site1
#SBATCH --comment=xffl/xffl_federation/manual__2026-01-01T00:00:00+00:00/train_site1/-1
#SBATCH --chdir=/scratch/alice/xffl/round-3
#SBATCH --output=/scratch/alice/xffl/round-3/xffl_federation.train_site1-%j.log
#SBATCH --open-mode=append
#SBATCH --partition=boost_usr_prod
#SBATCH --account=EUHPC_A02_031
#SBATCH --qos=normal
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=a100:4
#SBATCH --mem=480G
#SBATCH --time=1-12:00:00
#SBATCH --exclusive
#SBATCH --constraint=gpu
# Written by xffl-airflow: the lines above are sbatch options, the lines below run in the job.
set -e
export HF_HOME='/scratch/alice/hf cache'
export NOTE='it'"'"'s $HOME `x`'
export XFFL_ROUND=3
module load python/3.11
source $HOME/venvs/xffl/bin/activate
python -m xffl_tasks.train --config round-3/train.yaml
