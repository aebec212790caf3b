"""library_version: turns a library's VERSION file into a C++ header with a constant."""

def library_version(name, namespace, version_file = "VERSION"):
    """Generates `<package>/version.h` with `namespace <namespace> { constexpr char kVersion[]; }`."""
    native.genrule(
        name = name + "_gen",
        srcs = [version_file],
        outs = ["version.h"],
        cmd = ("v=$$(tr -d ' \\n\\r' < $<); " +
               "case $$v in [0-9]*.[0-9]*.[0-9]*) ;; *) echo \"$<: not a semver version: $$v\" >&2; exit 1;; esac; " +
               "printf '#pragma once\\n// Generated from %s.\\nnamespace %s {\\ninline constexpr char kVersion[] = \"%s\";\\n}  // namespace %s\\n' " +
               "$< " + namespace + " $$v " + namespace + " > $@"),
    )
    native.cc_library(
        name = name,
        hdrs = ["version.h"],
        visibility = ["//visibility:public"],
    )
