#!/bin/sh
echo "bazel coverage is not supported in the offline lego build" >&2
exit 1
