"""`sockpol agent`: keep a node's loaded policies equal to a desired state.

The desired state comes from a directory (a mounted ConfigMap: policy files and a targets file,
dirsource.py) or from the Kubernetes API (`SockPolicy` objects and this node's pods, kube.py).
Pods are resolved to their cgroup v2 directories (cgroups.py); the reconciler (reconciler.py)
compiles, loads, hot-reloads, unloads and repairs through sockpol.runtime, under names that mark
the agent's ownership (names.py). main.py wires it together with the HTTP server (server.py),
structured logs (logs.py), back-off (backoff.py) and the wake-up on new pod cgroups
(cgwatch.py). See docs/kubernetes.md.
"""
