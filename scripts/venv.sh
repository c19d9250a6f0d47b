# Sourced by train.sh and test.sh: create or reuse .venv and install the pinned requirements.
# A stamp file skips pip when requirements.txt has not changed since the last install.
python3 -c 'import sys; assert sys.version_info >= (3, 10), "minRLHF needs Python 3.10 or newer"'
# train.sh and test.sh may start side by side: one creates and fills .venv while the other waits
# (flock, where the system has it), so neither sees a half-made one.
exec 9>.venv.lock
if command -v flock >/dev/null; then flock 9; fi
[ -x .venv/bin/python ] || python3 -m venv .venv
source .venv/bin/activate
if ! cmp -s requirements.txt .venv/.requirements.stamp; then
    python -m pip install -q --upgrade pip
    python -m pip install -q -r requirements.txt
    cp requirements.txt .venv/.requirements.stamp
fi
exec 9>&-  # the lock goes with the file descriptor
