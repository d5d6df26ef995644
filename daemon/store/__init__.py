"""The outbox: the only package that speaks SQL (schema, migrations, group-commit writer, every statement)."""
