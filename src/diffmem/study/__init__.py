"""A K sweep as one resumable study: configuration, crash-safe run store, executors, runner."""
