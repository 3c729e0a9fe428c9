"""The node's public REST API: app factory, middlewares, schemas and route groups."""
