# shellcheck shell=bash
# Sourced by bench/run.sh and bench/ab.sh: the upstream nginx and what it serves, the proxy's
# route, and nginx as a forwarder, so an A/B measures the same exchange as the full benchmark.

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

# What every nginx.conf here starts with, for WORKERS workers and files in DIR, up to and
# including the opening of its http block; the caller adds its own directives and closes it.
nginx_conf_head() { # $1 dir $2 workers
    local t
    echo "worker_processes $2;"
    ((EUID == 0)) && echo "user root;" # the temp dir is 0700
    cat <<EOF
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
EOF
    for t in client_body proxy fastcgi uwsgi scgi; do echo "  ${t}_temp_path $1/tmp_$t;"; done
}

# nginx doing this proxy's job: listens on 127.0.0.1:PORT, sets the token and forwards over a
# pooled TLS connection to the upstream on 127.0.0.1:UP_PORT.
nginx_forwarder() { # $1 dir $2 workers $3 port $4 upstream port $5 token $6 CA file
    cat <<EOF
$(nginx_conf_head "$1" "$2")
  keepalive_timeout 300s;
  keepalive_requests 1000000000;
  proxy_max_temp_file_size 0;
  upstream bitbucket {
    server 127.0.0.1:$4;
    keepalive 64;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:$3;
    location / {
      proxy_pass https://bitbucket;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer $5";
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate $6;
      proxy_ssl_name 127.0.0.1;
      proxy_ssl_session_reuse on;
    }
  }
}
EOF
}

# A location that serves FILE as TYPE at PATH to requests bearing TOKEN, 401 to others.
bearer_location() { # $1 path $2 file $3 content type $4 token
    cat <<EOF
    location = $1 {
      if (\$http_authorization != "Bearer $4") { return 401; }
      types { } default_type $3;
      alias $2;
    }
EOF
}

# nginx as the benchmarks' Bitbucket: TLS (1.2, 1.3) with h2 and http/1.1 on 127.0.0.1:PORT,
# with the leaf of PKI; LOCATIONS (from bearer_location) in that server, 404 elsewhere, and
# any further server blocks after it.
nginx_upstream() { # $1 dir $2 workers $3 port $4 pki dir $5 locations [$6 further servers]
    cat <<EOF
$(nginx_conf_head "$1" "$2")
  sendfile on;
  tcp_nodelay on;
  keepalive_timeout 300s;
  keepalive_requests 1000000000;
  server {
    listen 127.0.0.1:$3 ssl http2;
    ssl_certificate $4/leaf.pem;
    ssl_certificate_key $4/leaf.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:bench:1m;
$5
    location / { return 404; }
  }
${6:-}
}
EOF
}

# utime+stime and utime, in clock ticks, summed over the given pids, from one reading each.
cpu_ticks() { # pids...
    local pid stat fields total=0 user=0
    for pid; do
        stat=$(<"/proc/$pid/stat")
        read -r -a fields <<<"${stat##*) }"
        total=$((total + fields[11] + fields[12])) user=$((user + fields[11]))
    done
    echo "$total $user"
}

# The single-page set-up of bench/ab.sh and bench/instructions.sh, in WORK: certificates
# (WORK/pki), the page at $BENCH_PAGE and an nginx upstream config (WORK/up) for UP_PORT that
# serves it to TOKEN. The caller starts nginx (`-p WORK/up -c WORK/up/nginx.conf`).
BENCH_PAGE=/2.0/repositories/acme/widgets
page_upstream_files() { # $1 work dir $2 upstream port $3 token
    mkdir -p "$1/pki" "$1/www" "$1/up"
    throwaway_pki "$1/pki" 2>/dev/null
    bench_page "https://127.0.0.1:$2$BENCH_PAGE" >"$1/www/page.json"
    nginx_upstream "$1/up" 1 "$2" "$1/pki" \
        "$(bearer_location "$BENCH_PAGE" "$1/www/page.json" application/json "$3")" >"$1/up/nginx.conf"
}

# The proxy config of those scripts, as bench/run.sh's proxy target (like for like with
# forwarders that neither rewrite nor coalesce), in DIR/proxy.toml: DIR is a directory of its
# own, as the proxy watches its config's directory.
page_proxy_conf() { # $1 dir $2 port $3 upstream origin $4 CA file $5 token
    mkdir -p "$1"
    cat >"$1/proxy.toml" <<EOT
[server]
listen = ["127.0.0.1:$2"]

[upstream]
api_url = "$3"
ca_file = "$4"

$(acme_route "$5")
rewrite_links = false
coalesce = false
EOT
}

# need_tools SCRIPT TOOL...: stops SCRIPT, naming the first TOOL this machine lacks.
need_tools() {
    local script=$1 tool
    shift
    for tool; do
        command -v "$tool" >/dev/null || { echo "$script: needs $tool" >&2; exit 1; }
    done
}
