# shellcheck shell=bash
# Sourced by bench/run.sh and bench/ab.sh: what both serve and forward, so an A/B measures the
# same exchange as the full benchmark.

# bench_page URL: the 1.3 KiB page, a repository as Bitbucket describes it, whose API links
# point at URL (the page's own address at the upstream).
bench_page() {
    local U=$1
    cat <<EOF
{"type":"repository","full_name":"acme/widgets","links":{"self":{"href":"$U"},"html":{"href":"https://bitbucket.org/acme/widgets"},"pullrequests":{"href":"$U/pullrequests"},"commits":{"href":"$U/commits"},"forks":{"href":"$U/forks"},"branches":{"href":"$U/refs/branches"},"tags":{"href":"$U/refs/tags"},"source":{"href":"$U/src"},"clone":[{"name":"https","href":"https://bitbucket.org/acme/widgets.git"},{"name":"ssh","href":"git@bitbucket.org:acme/widgets.git"}]},"name":"widgets","slug":"widgets","scm":"git","owner":{"type":"team","uuid":"{0c1d2e3f-4a5b-4c6d-8e7f-8091a2b3c4d5}","username":"acme"},"is_private":true,"project":{"type":"project","key":"WEB","name":"Web"},"fork_policy":"no_public_forks","created_on":"2021-03-04T10:11:12.345678+00:00","updated_on":"2024-11-05T08:09:10.111213+00:00","size":4521877,"language":"rust","uuid":"{6b7d3e1a-5c2f-4f0e-9a51-2b8e0c4d7f13}","mainbranch":{"name":"main","type":"branch"},"has_issues":false}
EOF
}

# acme_route TOKEN: the credential and the one route of every benchmark proxy config; keys of
# the route may follow.
acme_route() {
    cat <<EOF
[credentials.acme]
kind = "workspace_access_token"
workspace = "acme"
token = { value = "$1" }

[[routes]]
prefix = "/2.0/repositories/acme"
credential = "acme"
EOF
}
