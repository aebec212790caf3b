#!/bin/sh
echo "coverage is unavailable in tessera's offline Bazel setup" >&2
exit 1
