# -*- coding: utf-8 -*-
"""SQL file handling for the migration runner: directives, statement splitting, CIC parsing.

A migration file whose first line is ``-- dbops:no-transaction`` is split into statements that
run one by one in autocommit (CREATE/DROP INDEX CONCURRENTLY cannot run in a transaction block).
The splitter understands 'strings' (with '' and E'\\' escapes), "identifiers", $tag$ dollar
quotes $tag$, -- line comments and nested /* block comments */. Not supported: SQL-standard
``BEGIN ATOMIC ... END`` function bodies (use dollar-quoted bodies).
"""
from __future__ import annotations

import hashlib
import re

NO_TRANSACTION = "-- dbops:no-transaction"
_SUPERSEDES = re.compile(r"^--\s*dbops:supersedes\s+sha256:([0-9a-f]{64})\s*$", re.MULTILINE)

_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_CIC = re.compile(
    r"""^\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+IF\s+NOT\s+EXISTS\s+
        (?P<name>"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)\s+ON\s+(?:ONLY\s+)?
        (?P<table>(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)(?:\s*\.\s*(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*))?)""",
    re.IGNORECASE | re.VERBOSE)


def checksum(sql: str) -> str:
    """sha256 of the file text with line endings normalised (CRLF checkouts keep their checksum)."""
    return hashlib.sha256(sql.replace("\r\n", "\n").encode("utf-8")).hexdigest()


def supersedes(sql: str) -> list:
    """Checksums declared by ``-- dbops:supersedes sha256:<hex>`` lines: earlier texts of the same
    versioned file whose effect includes everything this text creates (a ledger row holding one of
    them is re-stamped with the new checksum instead of being refused as drift)."""
    return _SUPERSEDES.findall(sql.replace("\r\n", "\n"))


def is_no_transaction(sql: str) -> bool:
    first = sql.lstrip("\ufeff").split("\n", 1)[0].strip().lower()
    return first == NO_TRANSACTION


def split_statements(sql: str):
    """Split SQL text into [(statement, first_line_number)], dropping empty/comment-only ones."""
    out = []
    buf = []
    i, n = 0, len(sql)
    line = 1
    start_line = None
    has_code = False

    def flush():
        nonlocal buf, start_line, has_code
        text = "".join(buf).strip()
        if has_code and text:
            out.append((text, start_line))
        buf, start_line, has_code = [], None, False

    while i < n:
        c = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        if c == "-" and nxt == "-":  # line comment
            j = sql.find("\n", i)
            j = n if j < 0 else j
            if has_code:  # comments before a statement's first token are not part of it
                buf.append(sql[i:j])
            i = j
            continue
        if c == "/" and nxt == "*":  # nested block comment
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            chunk = sql[i:j]
            line += chunk.count("\n")
            if has_code:
                buf.append(chunk)
            i = j
            continue
        if not has_code and not c.isspace() and c != ";":
            has_code, start_line = True, line
        if c == "'":
            escaped = i > 0 and sql[i - 1] in "eE" and (i < 2 or not (sql[i - 2].isalnum() or sql[i - 2] == "_"))
            j = i + 1
            while j < n:
                if escaped and sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == "'":
                    if j + 1 < n and sql[j + 1] == "'":
                        j += 2
                        continue
                    break
                j += 1
            chunk = sql[i:j + 1]
            line += chunk.count("\n")
            buf.append(chunk)
            i = j + 1
            continue
        if c == '"':
            j = sql.find('"', i + 1)
            while j != -1 and j + 1 < n and sql[j + 1] == '"':
                j = sql.find('"', j + 2)
            j = n - 1 if j < 0 else j
            chunk = sql[i:j + 1]
            line += chunk.count("\n")
            buf.append(chunk)
            i = j + 1
            continue
        if c == "$" and not (i > 0 and (sql[i - 1].isalnum() or sql[i - 1] == "_")):
            m = _DOLLAR.match(sql, i)
            if m:
                tag = m.group(0)
                end = sql.find(tag, m.end())
                end = n if end < 0 else end + len(tag)
                chunk = sql[i:end]
                line += chunk.count("\n")
                buf.append(chunk)
                i = end
                continue
        if c == ";":
            flush()
            i += 1
            continue
        if c == "\n":
            line += 1
        buf.append(c)
        i += 1
    flush()
    return out


_CONCURRENT = re.compile(r"^\s*(CREATE\s+(UNIQUE\s+)?INDEX|DROP\s+INDEX|REINDEX\s+\(?[^;]*?)\s+CONCURRENTLY\b",
                         re.IGNORECASE)


def is_concurrent(statement: str) -> bool:
    """CREATE/DROP INDEX CONCURRENTLY or REINDEX ... CONCURRENTLY: waits that do not block DML."""
    return bool(_CONCURRENT.match(statement)) or bool(
        re.match(r"^\s*REINDEX\b.*\bCONCURRENTLY\b", statement, re.IGNORECASE | re.DOTALL))


def concurrent_index(statement: str):
    """For ``CREATE [UNIQUE] INDEX CONCURRENTLY IF NOT EXISTS name ON [schema.]table``
    return (schema or None, index_name); otherwise None."""
    m = _CIC.match(statement)
    if not m:
        return None

    def unquote(ident):
        ident = ident.strip()
        return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident.lower()

    table = m.group("table")
    schema = None
    parts = re.split(r'\s*\.\s*(?=(?:[^"]*"[^"]*")*[^"]*$)', table)
    if len(parts) == 2:
        schema = unquote(parts[0])
    return schema, unquote(m.group("name"))
