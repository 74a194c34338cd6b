"""Wake the agent the moment kubelet makes a pod's cgroup (inotify on the QoS directories).

kubelet creates a pod's cgroup before it creates the pod's sandbox and starts its containers;
the pod object itself reached the agent's watch when the pod was bound to the node. Waking on the
cgroup's creation (a `mkdir` there raises IN_CREATE on its parent, cgroupfs included) lets the
agent load the pod's policy while its sandbox is still being set up, usually before any of its
processes can open a connection, instead of waiting for the pod's next status update or the
next periodic pass. The watched directories are the parents of pod cgroups under both drivers
(`kubepods`, `kubepods/burstable`, `kubepods.slice/kubepods-besteffort.slice`, ...); those that
do not exist yet are added when they do (`refresh`, every pass).
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import threading
from pathlib import Path

log = logging.getLogger("sockpol.agent")

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# A directory source: kubelet swaps a mounted ConfigMap's `..data` symlink with a rename
# (IN_MOVED_TO); a plain directory is edited in place or by rename.
SOURCE_CHANGES = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE


class CgroupWatcher:
    """Wakes the loop when kubelet makes a pod cgroup in `directories`, and when a file of a
    directory source (`sources`) changes, so that a ConfigMap's update is read at once, not
    at the next periodic pass."""

    def __init__(
        self, directories: list[Path], wake: threading.Event, sources: list[Path] = ()
    ) -> None:
        self.directories, self.wake = directories, wake
        self._masks = {d: IN_CREATE | IN_ONLYDIR for d in directories}
        self._masks.update({d: SOURCE_CHANGES | IN_ONLYDIR for d in sources})
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._watched: set[Path] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cgroup-watch", daemon=True)
        self.refresh()

    def refresh(self) -> None:
        """Watch the directories that exist now (kubelet makes them at its start)."""
        for d, mask in self._masks.items():
            if d in self._watched or not d.is_dir():
                continue
            wd = self._libc.inotify_add_watch(self._fd, str(d).encode(), mask)
            if wd >= 0:
                self._watched.add(d)

    @property
    def watched(self) -> set[Path]:
        return set(self._watched)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        os.close(self._fd)

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.5)
            if not ready:
                continue
            try:
                while os.read(self._fd, 65536):
                    pass
            except BlockingIOError:
                pass
            self.wake.set()
