"""Small inputs the application builders read: gettext catalogs and a Python source tree, written here."""

from __future__ import annotations

from pathlib import Path

import polib
import pytest

MESSAGES = [  # (msgid, msgstr): real-looking messages, some with placeholders
    ("Cannot open file %s", "Datei %s kann nicht geöffnet werden"),
    ("cannot open file %s.", "Datei %s kann nicht geöffnet werden."),  # same normal form as the first
    ("File not found", "Datei nicht gefunden"),
    ("Permission denied", "Keine Berechtigung"),
    ("Copy %1$s to %2$s", "%2$s aus %1$s kopieren"),  # reordered placeholders are fine
    ("Done.", "Fertig."),
    ("Unknown option: %s", "Unbekannte Option: %s"),
    ("Invalid argument", "Ungültiges Argument"),
    ("Show help", "Hilfe anzeigen"),
    ("Quit", "Beenden"),
] + [(f"Item {w}", f"Eintrag {w}") for w in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")]

DROPPED = [  # entries the builder must leave out, with the reason it counts them under
    (polib.POEntry(msgid="Untranslated", msgstr=""), "untranslated messages"),
    (polib.POEntry(msgid="Maybe wrong", msgstr="Vielleicht falsch", flags=["fuzzy"]), "fuzzy or obsolete entries"),
    (polib.POEntry(msgid="%d file", msgid_plural="%d files", msgstr_plural={0: "%d Datei", 1: "%d Dateien"}),
     "plural forms"),
    (polib.POEntry(msgid="Read %s bytes", msgstr="Lese Bytes"), "translations whose placeholders differ"),
    (polib.POEntry(msgid="x" * 101, msgstr="y"), "messages over 100 characters"),
]


def write_catalog(path: Path, messages: list[tuple[str, str]], extra: list[polib.POEntry] = ()) -> Path:
    po = polib.POFile()
    po.metadata = {"Content-Type": "text/plain; charset=UTF-8", "Language": "de"}
    for msgid, msgstr in messages:
        po.append(polib.POEntry(msgid=msgid, msgstr=msgstr))
    for entry in extra:
        po.append(entry)
    if path.suffix == ".mo":
        po.save_as_mofile(str(path))  # what msgfmt does: fuzzy entries left out, the hash table written
    else:
        po.save(str(path))
    return path


@pytest.fixture
def catalogs(tmp_path) -> Path:
    """LC_MESSAGES-like folder: a compiled .mo, a .po with the entries to drop, and two malformed files."""
    folder = tmp_path / "LC_MESSAGES"
    folder.mkdir()
    write_catalog(folder / "tool.mo", MESSAGES[:12])
    write_catalog(folder / "other.po", MESSAGES[12:], [e for e, _ in DROPPED])
    (folder / "broken.mo").write_bytes(b"\xde\x12\x04\x95 not a catalog")
    (folder / "broken.po").write_text('msgid "a"\nmsgstr "b"\nnot po syntax\n', encoding="utf-8")
    return folder


FUNCTIONS = '''
def read_config(path, encoding="utf-8", strict=False):
    """Read the configuration file at path. Blank lines are ignored.

    More details here.
    """
    with open(path, encoding=encoding) as f:
        return f.read()


def count_words(text, sep=None):
    """Return the number of words in text."""
    return len(text.split(sep))


class Stack:
    """A last-in, first-out stack of items."""

    def __init__(self):
        self.items = []

    def push(self, item, times=1):
        """Push an item onto the stack."""
        self.items += [item] * times


def undocumented(x):
    return x


def only_doc():
    """Nothing but a docstring here."""
'''


@pytest.fixture
def source_tree(tmp_path) -> Path:
    """A package of modules like the above (the names varied), plus one that does not parse and one not UTF-8."""
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    for i in range(12):
        text = FUNCTIONS.replace("read_config", f"read_config{i}").replace("count_words", f"count_words{i}") \
            .replace("Stack", f"Stack{i}").replace("stack of items", f"stack of {i} items")
        (root / "pkg" / f"mod{i:02d}.py").write_text(text, encoding="utf-8")
    (root / "pkg" / "bad_syntax.py").write_text("def broken(:\n    '''Doc.'''\n", encoding="utf-8")
    latin1 = 'def f():\n    """Caf\xe9 function here."""\n    return 1\n'.encode("latin-1")
    (root / "pkg" / "latin1.py").write_bytes(latin1)
    return root
