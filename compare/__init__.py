"""compare: reconciles the new schema against the old under the same compiled mapping."""
