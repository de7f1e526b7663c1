# Test-only connection for the Molecule scenarios: runs each task inside a local, rootful podman
# container by entering its namespaces with nsenter(1), with pipelining (one process per task).
# containers.podman.podman starts 3-4 `podman` commands per task (mount, mkdir, exec, rm: about
# 0.2 s each here); this starts one nsenter (a few ms). The server, the files and the processes are
# the container's: only the way a command gets in differs.
from __future__ import annotations

DOCUMENTATION = """
    name: podman_nsenter
    short_description: Run tasks in a local rootful podman container through nsenter (test-only)
    description:
        - Looks up the container's main process once (C(podman inspect)), then runs every command with
          C(nsenter --target PID --mount --uts --ipc --net --pid --root --wd) and a clean environment.
        - Files are copied in and out through the same entry (C(cat)). Needs root and util-linux's nsenter.
        - No privilege escalation (the scenarios run their modules as root in the container).
    author: scanner-dbops
    options:
        remote_addr:
            description: The container's name.
            default: inventory_hostname
            vars:
                - name: inventory_hostname
                - name: ansible_host
        podman_executable:
            description: The podman command.
            default: podman
            vars:
                - name: ansible_podman_executable
            env:
                - name: ANSIBLE_PODMAN_EXECUTABLE
    extends_documentation_fragment:
        - connection_pipelining
"""

import os
import shlex
import subprocess

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

display = Display()

# What a process started by `podman exec` in these images sees, and nothing of the controller's.
_ENV = ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME=/root", "LANG=C.UTF-8", "TERM=dumb"]


class Connection(ConnectionBase):
    transport = "podman_nsenter"
    has_pipelining = True
    has_tty = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pid = None

    def _connect(self):
        if self._connected:
            return self
        name = self.get_option("remote_addr")
        try:
            out = subprocess.run([self.get_option("podman_executable"), "inspect", "--format",
                                  "{{.State.Running}} {{.State.Pid}}", name],
                                 capture_output=True, check=False, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise AnsibleConnectionFailure(f"podman inspect {name}: {e}") from e
        fields = to_text(out.stdout).split()
        if out.returncode != 0 or len(fields) != 2 or fields[0] != "true" or int(fields[1]) <= 0:
            raise AnsibleConnectionFailure(
                f"container {name} is not running: {to_text(out.stderr).strip() or to_text(out.stdout).strip()}")
        self._pid = fields[1]
        display.vvv(f"ENTER container {name} (pid {self._pid})", host=name)
        self._connected = True
        return self

    def _argv(self, *command):
        return ["nsenter", "--target", self._pid, "--mount", "--uts", "--ipc", "--net", "--pid",
                "--root", "--wd", "--", *_ENV, *command]

    def exec_command(self, cmd, in_data=None, sudoable=False):
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        self._connect()
        display.vvv(f"EXEC {cmd}", host=self._play_context.remote_addr)
        p = subprocess.run(self._argv("/bin/sh", "-c", cmd), input=in_data, capture_output=True, check=False)
        return p.returncode, p.stdout, p.stderr

    def put_file(self, in_path, out_path):
        super().put_file(in_path, out_path)
        self._connect()
        display.vvv(f"PUT {in_path} TO {out_path}", host=self._play_context.remote_addr)
        if not os.path.exists(to_bytes(in_path, errors="surrogate_or_strict")):
            raise AnsibleFileNotFound(f"file or module does not exist: {in_path}")
        with open(to_bytes(in_path, errors="surrogate_or_strict"), "rb") as f:
            p = subprocess.run(self._argv("/bin/sh", "-c", f"cat > {shlex.quote(out_path)}"), stdin=f,
                               capture_output=True, check=False)
        if p.returncode != 0:
            raise AnsibleError(f"failed to put {in_path} to {out_path}: {to_text(p.stderr).strip()}")

    def fetch_file(self, in_path, out_path):
        super().fetch_file(in_path, out_path)
        self._connect()
        display.vvv(f"FETCH {in_path} TO {out_path}", host=self._play_context.remote_addr)
        with open(to_bytes(out_path, errors="surrogate_or_strict"), "wb") as f:
            p = subprocess.run(self._argv("cat", in_path), stdout=f, stderr=subprocess.PIPE, check=False)
        if p.returncode != 0:
            raise AnsibleError(f"failed to fetch {in_path}: {to_text(p.stderr).strip()}")

    def close(self):
        self._connected = False
