# Sourced by the bench scripts: a throwaway CA and an ECDSA P-256 leaf for IP:127.0.0.1.
# throwaway_pki DIR writes DIR/ca.pem, DIR/leaf.pem and DIR/leaf.key (openssl's chatter on
# stderr); the CA is valid for two days and trusted only by what a run starts.
throwaway_pki() {
    (
        cd "$1" || exit
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key
        openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=bench throwaway CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem
        openssl ecparam -name prime256v1 -genkey -noout -out leaf.key
        openssl req -new -key leaf.key -subj "/CN=127.0.0.1" -out leaf.csr
        printf '%s\n' "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
            "subjectAltName=IP:127.0.0.1" >leaf.ext
        openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -sha256 \
            -extfile leaf.ext -out leaf.pem
    )
}
