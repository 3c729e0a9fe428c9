"""App ingress: HTTP and websocket traffic to app instances through any node.

- `proxy` forwards requests of `/proxy/{app}/...` (and of the optional host-routed
  `ingress_port`) to a healthy instance.
- `balancer` keeps each app's rotation of instances, with its strategy and
  per-instance circuit breakers.
- `headers` removes hop-by-hop headers and adds the X-Forwarded-* ones.
- `traffic` counts requests per app and merges the counts of several nodes.
- `upstream` is the HTTP/1.1 client that sends forwarded requests to instances.
"""
