package main

// The "original Akeyless plugin" mode (standin akeyless-original): what the image kms-plugin replaces in
// drop-in mode does on the wire, for the e2e swap flow. KMS v1beta1 only; configuration from the
// original's environment; each Encrypt is one Akeyless /encrypt whose result string is the v1 cipher,
// each Decrypt one /decrypt of that string.

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	kmsv1 "k8s.io/kms/apis/v1beta1"
)

type akeylessOriginal struct {
	kmsv1.UnimplementedKeyManagementServiceServer
	url, keyName, accessID, accessKey string
	client                            *http.Client
	mu                                sync.Mutex
	token                             string
}

func mustEnv(name string) (string, error) {
	v := os.Getenv(name)
	if v == "" {
		return "", fmt.Errorf("%s is not set", name)
	}
	return v, nil
}

// call POSTs body to <url>/<command> and returns the decoded JSON answer; an Akeyless error answer
// (`{"error": ...}`) or a non-200 status is an error.
func (a *akeylessOriginal) call(ctx context.Context, command string, body map[string]string) (map[string]any, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, a.url+"/"+command, bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := a.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	var out map[string]any
	if err := json.Unmarshal(raw, &out); err != nil {
		return nil, fmt.Errorf("%s: HTTP %d, not JSON", command, resp.StatusCode)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: HTTP %d: %v", command, resp.StatusCode, out["error"])
	}
	return out, nil
}

func (a *akeylessOriginal) auth(ctx context.Context) (string, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.token != "" {
		return a.token, nil
	}
	out, err := a.call(ctx, "auth", map[string]string{"access-type": "access_key", "access-id": a.accessID, "access-key": a.accessKey})
	if err != nil {
		return "", err
	}
	tok, _ := out["token"].(string)
	if tok == "" {
		return "", errors.New("auth: no token in the answer")
	}
	a.token = tok
	return tok, nil
}

// crypt runs one /encrypt or /decrypt, authenticating again once if the token was refused.
func (a *akeylessOriginal) crypt(ctx context.Context, command string, body map[string]string) (string, error) {
	for attempt := 0; ; attempt++ {
		tok, err := a.auth(ctx)
		if err != nil {
			return "", err
		}
		body["token"] = tok
		out, err := a.call(ctx, command, body)
		if err == nil {
			res, _ := out["result"].(string)
			if res == "" {
				return "", fmt.Errorf("%s: no result in the answer", command)
			}
			return res, nil
		}
		if attempt > 0 {
			return "", err
		}
		a.mu.Lock()
		a.token = ""
		a.mu.Unlock()
	}
}

func (a *akeylessOriginal) Version(context.Context, *kmsv1.VersionRequest) (*kmsv1.VersionResponse, error) {
	return &kmsv1.VersionResponse{Version: "v1beta1", RuntimeName: "AKEYLESS", RuntimeVersion: "0.0.1"}, nil
}

func (a *akeylessOriginal) Encrypt(ctx context.Context, r *kmsv1.EncryptRequest) (*kmsv1.EncryptResponse, error) {
	res, err := a.crypt(ctx, "encrypt", map[string]string{
		"key-name": a.keyName, "plaintext": base64.StdEncoding.EncodeToString(r.Plain), "input-format": "base64",
	})
	if err != nil {
		return nil, err
	}
	return &kmsv1.EncryptResponse{Cipher: []byte(res)}, nil
}

func (a *akeylessOriginal) Decrypt(ctx context.Context, r *kmsv1.DecryptRequest) (*kmsv1.DecryptResponse, error) {
	res, err := a.crypt(ctx, "decrypt", map[string]string{
		"key-name": a.keyName, "ciphertext": string(r.Cipher), "output-format": "base64",
	})
	if err != nil {
		return nil, err
	}
	pt, err := base64.StdEncoding.DecodeString(res)
	if err != nil {
		return nil, errors.New("decrypt: result is not base64")
	}
	return &kmsv1.DecryptResponse{Plain: pt}, nil
}

func serveAkeylessOriginal() error {
	a := &akeylessOriginal{client: &http.Client{Timeout: 10 * time.Second}}
	var err error
	for _, v := range []struct {
		dst  *string
		name string
	}{{&a.url, "AKEYLESS_URL"}, {&a.keyName, "AKEYLESS_KEY_ENCRYPTION_KEY"}, {&a.accessID, "AKEYLESS_ACCESS_ID"}, {&a.accessKey, "AKEYLESS_ACCESS_KEY"}} {
		if *v.dst, err = mustEnv(v.name); err != nil {
			return err
		}
	}
	path := os.Getenv("AKEYLESS_UNIX_SOCKET")
	if path == "" {
		path = "/tmp/akeyless_kms_plugin.sock"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := a.auth(ctx); err != nil {
		return fmt.Errorf("authenticate to %s: %w", a.url, err)
	}
	_ = os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	s := grpc.NewServer()
	kmsv1.RegisterKeyManagementServiceServer(s, a)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-sig; s.Stop() }()
	return s.Serve(l)
}
