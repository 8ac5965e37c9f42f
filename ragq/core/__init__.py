"""The ground floor: errors, settings, sizes, the database schema, embedded services, tracing, document
loading and chunking. It imports nothing of ragq's other packages; scheduler/, workers/, tasks/ and the CLI stand on it."""
