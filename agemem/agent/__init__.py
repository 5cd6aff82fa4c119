"""Tool schemas, tool-call parsing, the context window and the three-stage episode engine."""
