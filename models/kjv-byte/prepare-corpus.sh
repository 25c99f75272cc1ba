#!/usr/bin/env bash
# Builds the training text of the bundled model: the King James Version of the Bible from
# Debian's `bible-kjv` package (the text is public domain; the package's program is GPL-2),
# one verse per line, verse numbers dropped, chapter headings kept.
# Usage: bash models/kjv-byte/prepare-corpus.sh OUT.txt
set -euo pipefail
out=${1:?usage: prepare-corpus.sh OUT.txt}
command -v bible >/dev/null || sudo apt-get install -y bible-kjv
bible Gen1:1-Rev22:21 | python3 -c '
import re, sys
verses, current = [], None
for line in sys.stdin:
    line = line.rstrip()
    m = re.match(r"^\s+\d+ (.*)$", line)
    if m:
        if current: verses.append(current)
        current = m.group(1)
    elif line and current is not None and not re.match(r"^\S.* \d+$", line):
        current += " " + line.strip()
    elif line:
        if current: verses.append(current)
        current = None
        verses.append("\n" + line)
if current: verses.append(current)
print("\n".join(verses).strip())
' > "$out"
echo "$out: $(wc -c < "$out") bytes"
