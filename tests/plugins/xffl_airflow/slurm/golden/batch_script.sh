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
# The job's end goes to an end record beside its log (see xffl_airflow.slurm.script).
xffl_end=/scratch/alice/xffl/round-3/xffl_federation.train_site1-"${SLURM_JOB_ID}".log.end
xffl_start=$(date +%s) xffl_signal="" xffl_child=""
xffl_record() {
  xffl_rc=$?
  trap - EXIT TERM
  if [ -n "$xffl_end" ]; then
    { printf 'xffl-end 1 job=%s rc=%s signal=%s start=%s end=%s limit=%s\n' "${SLURM_JOB_ID:-}" "$xffl_rc" "$xffl_signal" "$xffl_start" "$(date +%s)" 129600 >"$xffl_end.$$.tmp" && mv -f -- "$xffl_end.$$.tmp" "$xffl_end"; } 2>/dev/null || :
  fi
  # stopped by a signal: end by the same signal, so Slurm records it as such (0:15)
  if [ "$xffl_signal" = TERM ]; then kill -TERM "$$"; fi
  exit "$xffl_rc"
}
trap 'xffl_signal=TERM; [ -z "$xffl_child" ] || kill -TERM "$xffl_child" 2>/dev/null; exit 143' TERM
trap xffl_record EXIT
if [ -n "$xffl_end" ]; then rm -f -- "$xffl_end"; fi
set -e
export HF_HOME='/scratch/alice/hf cache'
export NOTE='it'"'"'s $HOME `x`'
export XFFL_ROUND=3
module load python/3.11
source $HOME/venvs/xffl/bin/activate
(
python -m xffl_tasks.train --config round-3/train.yaml
) &
xffl_child=$!
wait "$xffl_child"
