// standin is a test-only KMS plugin written in Go that mimics the command line of kms-plugin just
// enough to develop and self-check the Kubernetes harness (tests/k8s) without the Rust binary:
//
//	standin keygen [--add] FILE
//	standin serve --listen unix:///path/kms.sock --backend local --local-key-file FILE [--probe-interval 1s]
//	standin akeyless-original   (env AKEYLESS_*: the original Akeyless plugin's wire behaviour, akeyless.go)
//
// It serves KMS v2 and v1beta1 on one socket. Its key file format is its own (JSON); only the
// harness's use of `keygen`/`keygen --add` matters. It is never used by `make test` unless
// KMS_PLUGIN_BIN points at it.
package main

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	kmsv1 "k8s.io/kms/apis/v1beta1"
	kmsv2 "k8s.io/kms/apis/v2"
)

type keyFile struct {
	Keys []keyEntry `json:"keys"`
}

type keyEntry struct {
	Name string `json:"name"`
	Key  []byte `json:"key"`
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: standin keygen|serve ...")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "keygen":
		err = keygen(os.Args[2:])
	case "serve":
		err = serve(os.Args[2:])
	case "akeyless-original":
		err = serveAkeylessOriginal()
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "standin:", err)
		os.Exit(1)
	}
}

func keygen(args []string) error {
	fs := flag.NewFlagSet("keygen", flag.ContinueOnError)
	add := fs.Bool("add", false, "append a new primary key")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("keygen needs FILE")
	}
	path := fs.Arg(0)
	var kf keyFile
	if *add {
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if err := json.Unmarshal(b, &kf); err != nil {
			return err
		}
	} else if _, err := os.Stat(path); err == nil {
		return fmt.Errorf("%s exists", path)
	}
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return err
	}
	kf.Keys = append(kf.Keys, keyEntry{Name: fmt.Sprintf("k%d-%d", len(kf.Keys)+1, time.Now().UnixNano()), Key: k})
	b, err := json.Marshal(kf)
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

type keys struct {
	mu      sync.RWMutex
	path    string
	primary string
	all     map[string]cipher.AEAD
}

func (k *keys) reload() error {
	b, err := os.ReadFile(k.path)
	if err != nil {
		return err
	}
	var kf keyFile
	if err := json.Unmarshal(b, &kf); err != nil {
		return err
	}
	if len(kf.Keys) == 0 {
		return errors.New("no keys")
	}
	all := map[string]cipher.AEAD{}
	for _, e := range kf.Keys {
		blk, err := aes.NewCipher(e.Key)
		if err != nil {
			return err
		}
		g, err := cipher.NewGCM(blk)
		if err != nil {
			return err
		}
		all[e.Name] = g
	}
	k.mu.Lock()
	k.primary = kf.Keys[len(kf.Keys)-1].Name
	k.all = all
	k.mu.Unlock()
	return nil
}

// wrap returns the kms-plugin ciphertext layout (docs/format.md) closely enough for the harness:
// 0x4B, 1, len(name), name, uint16 len(body), body = nonce ‖ AES-GCM(plaintext).
func (k *keys) wrap(pt []byte) ([]byte, string, error) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	g := k.all[k.primary]
	nonce := make([]byte, g.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, "", err
	}
	body := g.Seal(nonce, nonce, pt, nil)
	out := []byte{0x4B, 1, byte(len(k.primary))}
	out = append(out, k.primary...)
	out = append(out, byte(len(body)>>8), byte(len(body)))
	return append(out, body...), k.primary, nil
}

func (k *keys) unwrap(ct []byte) ([]byte, error) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	if len(ct) < 3 || ct[0] != 0x4B || ct[1] != 1 || len(ct) < 5+int(ct[2]) {
		return nil, errors.New("bad ciphertext")
	}
	r := int(ct[2])
	g, ok := k.all[string(ct[3:3+r])]
	if !ok {
		return nil, errors.New("unknown key")
	}
	body := ct[5+r:]
	if len(body) < g.NonceSize() || int(ct[3+r])<<8|int(ct[4+r]) != len(body) {
		return nil, errors.New("bad ciphertext")
	}
	return g.Open(nil, body[:g.NonceSize()], body[g.NonceSize():], nil)
}

func (k *keys) keyID() string {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return "standin:" + k.primary
}

type v2srv struct {
	kmsv2.UnimplementedKeyManagementServiceServer
	k *keys
}

func (s *v2srv) Status(context.Context, *kmsv2.StatusRequest) (*kmsv2.StatusResponse, error) {
	return &kmsv2.StatusResponse{Version: "v2", Healthz: "ok", KeyId: s.k.keyID()}, nil
}

func (s *v2srv) Encrypt(_ context.Context, r *kmsv2.EncryptRequest) (*kmsv2.EncryptResponse, error) {
	ct, name, err := s.k.wrap(r.Plaintext)
	if err != nil {
		return nil, err
	}
	return &kmsv2.EncryptResponse{Ciphertext: ct, KeyId: "standin:" + name}, nil
}

func (s *v2srv) Decrypt(_ context.Context, r *kmsv2.DecryptRequest) (*kmsv2.DecryptResponse, error) {
	pt, err := s.k.unwrap(r.Ciphertext)
	if err != nil {
		return nil, err
	}
	return &kmsv2.DecryptResponse{Plaintext: pt}, nil
}

type v1srv struct {
	kmsv1.UnimplementedKeyManagementServiceServer
	k *keys
}

func (s *v1srv) Version(context.Context, *kmsv1.VersionRequest) (*kmsv1.VersionResponse, error) {
	return &kmsv1.VersionResponse{Version: "v1beta1", RuntimeName: "standin", RuntimeVersion: "0.0.1"}, nil
}

func (s *v1srv) Encrypt(_ context.Context, r *kmsv1.EncryptRequest) (*kmsv1.EncryptResponse, error) {
	ct, _, err := s.k.wrap(r.Plain)
	if err != nil {
		return nil, err
	}
	return &kmsv1.EncryptResponse{Cipher: ct}, nil
}

func (s *v1srv) Decrypt(_ context.Context, r *kmsv1.DecryptRequest) (*kmsv1.DecryptResponse, error) {
	pt, err := s.k.unwrap(r.Cipher)
	if err != nil {
		return nil, err
	}
	return &kmsv1.DecryptResponse{Plain: pt}, nil
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	listen := fs.String("listen", "", "unix:///path")
	backend := fs.String("backend", "local", "only local")
	keyFile := fs.String("local-key-file", "", "key file")
	probe := fs.Duration("probe-interval", 30*time.Second, "key file re-read interval")
	_ = fs.String("http", "", "ignored")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *backend != "local" {
		return fmt.Errorf("backend %q unsupported", *backend)
	}
	path, ok := strings.CutPrefix(*listen, "unix://")
	if !ok {
		return errors.New("--listen must be unix://")
	}
	k := &keys{path: *keyFile}
	if err := k.reload(); err != nil {
		return err
	}
	_ = os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	s := grpc.NewServer()
	kmsv2.RegisterKeyManagementServiceServer(s, &v2srv{k: k})
	kmsv1.RegisterKeyManagementServiceServer(s, &v1srv{k: k})
	go func() {
		t := time.NewTicker(*probe)
		for range t.C {
			if err := k.reload(); err != nil {
				fmt.Fprintln(os.Stderr, "standin: reload:", err)
			}
		}
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-sig; s.Stop() }()
	return s.Serve(l)
}
