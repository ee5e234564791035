"""Jobs: the persistent store, the GPU worker, live events and the service facade the API calls."""
