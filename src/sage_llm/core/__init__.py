"""Settings, paths, engine records, the audit log, errors: what every other part stands on."""
