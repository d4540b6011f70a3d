"""Everything that puts the GPT-J Serve application on Kubernetes: the KubeRay RayService manifests
(kustomize base + overlays under manifests/, rendered into rendered/), their renderer (render.py),
and the deploy tool `python -m kuberay` (cluster.py talks to the API server, status.py reads what
KubeRay reports, drain.py is the TPU workers' preStop hook)."""
