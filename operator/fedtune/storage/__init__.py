"""Object storage: key layout (pure), S3 access with credentials (operator side), embedded SeaweedFS."""
