"""Result records, tables and figures."""
