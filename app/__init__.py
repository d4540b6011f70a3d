"""The Ray Serve application: ingress -> batcher -> replica, bound in app.builder."""
