// Level 1 of the Kubernetes proof: the apiserver's own KMS client code (k8s.io/apiserver's
// encryptionconfig + envelope transformers) against a running kms-plugin binary.
//
// The same source is compiled against two k8s.io/apiserver versions (go.mod = newest v0.37.x,
// go.v031.mod = v0.31.x, whose gRPC clients send the socket path as the HTTP/2 :authority).
// See docs/testing.md.
package level1

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/rand"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/server/options/encryptionconfig"
	"k8s.io/apiserver/pkg/storage/value"
	"k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/klog/v2"

	"github.com/go-logr/logr"

	"google.golang.org/protobuf/encoding/protowire"
)

const apiServerID = "kms-plugin-level1"

var secrets = schema.GroupResource{Resource: "secrets"}

func TestMain(m *testing.M) {
	if optedOut("k8s") {
		fmt.Println("SKIP: tests/k8s level 1 opted out via KMS_TEST_OPT_OUT")
		os.Exit(0)
	}
	// KMS v1 is off by default since 1.29; the apiserver needs --feature-gates=KMSv1=true.
	klog.SetLogger(logr.Discard()) // hides the deprecated-gate warning
	if err := utilfeature.DefaultMutableFeatureGate.Set("KMSv1=true"); err != nil {
		fmt.Fprintln(os.Stderr, "enable KMSv1 feature gate:", err)
		os.Exit(1)
	}
	// Keep the library's own logging quiet (the tests provoke expected decrypt failures) unless asked for.
	if os.Getenv("KMS_TEST_VERBOSE") != "" {
		klog.ClearLogger()
	}
	if _, err := pluginBin(); err != nil {
		fmt.Fprintln(os.Stderr, "FAIL:", err)
		os.Exit(1)
	}
	fmt.Println("k8s.io/apiserver version under test:", apiserverVersion())
	os.Exit(m.Run())
}

func optedOut(name string) bool {
	for _, n := range strings.Split(os.Getenv("KMS_TEST_OPT_OUT"), ",") {
		if strings.TrimSpace(n) == name {
			return true
		}
	}
	return false
}

// apiserverVersion reads the k8s.io/apiserver version from the go.mod in use (test binaries carry
// no module build info). The Makefile passes the -modfile it used in KMS_L1_MODFILE.
func apiserverVersion() string {
	mf := os.Getenv("KMS_L1_MODFILE")
	if mf == "" {
		mf = "go.mod"
	}
	b, err := os.ReadFile(mf)
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "k8s.io/apiserver" {
			return f[1] + " (" + mf + ")"
		}
	}
	return "unknown"
}

// pluginBin is $KMS_PLUGIN_BIN or <repo>/target/debug/kms-plugin.
func pluginBin() (string, error) {
	p := os.Getenv("KMS_PLUGIN_BIN")
	if p == "" {
		wd, err := os.Getwd()
		if err != nil {
			return "", err
		}
		p = filepath.Join(wd, "..", "..", "..", "target", "debug", "kms-plugin")
	}
	p, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	if st, err := os.Stat(p); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
		return "", fmt.Errorf("kms-plugin binary not found or not executable at %s (build it with `cargo build`, or set KMS_PLUGIN_BIN)", p)
	}
	return p, nil
}

// plugin is one kms-plugin serve process with a local key file, or, with KMS_L1_BACKEND=vault, on
// a real Vault dev server's Transit key (KMS_TEST_VAULT_BIN, built by `make deps-vault`), or, with
// KMS_L1_BACKEND=kmip, on a key of a real PyKMIP server (pykmip-server from the test venv), or, with
// KMS_L1_BACKEND=gcp, on a CryptoKey of the Cloud KMS stand-in, or, with KMS_L1_BACKEND=azure, on
// an RSA key of the Key Vault stand-in.
type plugin struct {
	t       *testing.T
	bin     string
	dir     string
	sock    string
	keyFile string
	vault   *vaultServer
	kmip    *kmipServer
	gcp     *gcpFake
	azure   *azureFake
	cmd     *exec.Cmd
	done    chan struct{}
	out     *syncBuffer
}

// vaultServer is a `vault server -dev` with Transit mounted and the key l1-kek.
type vaultServer struct {
	url string
	cmd *exec.Cmd
	out *syncBuffer
}

func startVault(t *testing.T, dir string) *vaultServer {
	t.Helper()
	bin := os.Getenv("KMS_TEST_VAULT_BIN")
	if st, err := os.Stat(bin); bin == "" || err != nil || st.Mode()&0o111 == 0 {
		t.Fatalf("KMS_L1_BACKEND=vault needs a Vault server binary in KMS_TEST_VAULT_BIN (make deps-vault), got %q", bin)
	}
	addr := freeLoopbackAddr(t)
	v := &vaultServer{url: "http://" + addr, out: &syncBuffer{}}
	v.cmd = exec.Command(bin, "server", "-dev", "-dev-root-token-id=root", "-dev-no-store-token",
		"-dev-listen-address="+addr)
	v.cmd.Env = append(os.Environ(), "VAULT_DISABLE_MLOCK=true")
	v.cmd.Stdout, v.cmd.Stderr = v.out, v.out
	if err := v.cmd.Start(); err != nil {
		t.Fatalf("start vault: %v", err)
	}
	t.Cleanup(func() { _ = v.cmd.Process.Kill(); _ = v.cmd.Wait() })
	pollUntil(t, 60*time.Second, "the Vault dev server to answer", func() (bool, error) {
		return v.call("GET", "sys/health", "") == nil, nil
	})
	for _, c := range [][2]string{{"sys/mounts/transit", `{"type":"transit"}`}, {"transit/keys/l1-kek", `{"type":"aes256-gcm96"}`}} {
		if err := v.call("POST", c[0], c[1]); err != nil {
			t.Fatalf("vault %s: %v\n%s", c[0], err, v.out)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "vault.token"), []byte("root"), 0o600); err != nil {
		t.Fatal(err)
	}
	return v
}

// kmipServer is a real PyKMIP server (pykmip-server next to KMS_TEST_PYTHON) over mutual TLS with a
// test CA, holding the key l1-kek; the plugin authenticates with the test client certificate.
type kmipServer struct {
	py, certs, endpoint, outPath string
	cmd                          *exec.Cmd
}

// output is what pykmip-server printed so far, for failure messages.
func (k *kmipServer) output() string {
	b, _ := os.ReadFile(k.outPath)
	return string(b)
}

func startKMIP(t *testing.T, dir string) *kmipServer {
	t.Helper()
	py := os.Getenv("KMS_TEST_PYTHON")
	server := filepath.Join(filepath.Dir(py), "pykmip-server")
	if st, err := os.Stat(server); py == "" || err != nil || st.Mode()&0o111 == 0 {
		t.Fatalf("KMS_L1_BACKEND=kmip needs pykmip-server next to KMS_TEST_PYTHON (make deps), got %q", py)
	}
	k := &kmipServer{py: py, certs: filepath.Join(dir, "certs"), endpoint: freeLoopbackAddr(t)}
	k.python(t, filepath.Join(repoRoot(), "tests/fakes/akeyless_fake.py"), "--make-certs", k.certs)
	if err := os.MkdirAll(filepath.Join(dir, "policies"), 0o700); err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(k.endpoint)
	conf := fmt.Sprintf("[server]\nhostname=127.0.0.1\nport=%s\ncertificate_path=%s\nkey_path=%s\nca_path=%s\n"+
		"auth_suite=TLS1.2\nenable_tls_client_auth=True\nlogging_level=INFO\ndatabase_path=%s\npolicy_path=%s\n",
		port, filepath.Join(k.certs, "server.pem"), filepath.Join(k.certs, "server-key.pem"),
		filepath.Join(k.certs, "ca.pem"), filepath.Join(dir, "pykmip.sqlite"), filepath.Join(dir, "policies"))
	confPath := filepath.Join(dir, "pykmip.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	// PyKMIP serves each connection in a child process: the server gets its own process group, and
	// its output goes to a file (a pipe would stay open in the children and block Wait).
	outPath := filepath.Join(dir, "pykmip.out")
	outFile, err := os.Create(outPath)
	if err != nil {
		t.Fatal(err)
	}
	defer outFile.Close()
	k.outPath = outPath
	k.cmd = exec.Command(server, "-f", confPath, "-l", filepath.Join(dir, "pykmip.log"))
	k.cmd.Env = append(os.Environ(), "PYTHONWARNINGS=ignore")
	k.cmd.Stdout, k.cmd.Stderr = outFile, outFile
	k.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := k.cmd.Start(); err != nil {
		t.Fatalf("start pykmip-server: %v", err)
	}
	t.Cleanup(func() { _ = syscall.Kill(-k.cmd.Process.Pid, syscall.SIGKILL); _ = k.cmd.Wait() })
	pollUntil(t, 60*time.Second, "pykmip-server to accept connections on "+k.endpoint, func() (bool, error) {
		c, err := net.DialTimeout("tcp", k.endpoint, time.Second)
		if err != nil {
			return false, err
		}
		c.Close()
		return true, nil
	})
	k.createKey(t)
	return k
}

// createKey makes a new Active key named l1-kek: the first one, or its rotation (PyKMIP has no
// Re-key; the plugin follows the newest Active key of the name).
func (k *kmipServer) createKey(t *testing.T) {
	t.Helper()
	_, port, _ := net.SplitHostPort(k.endpoint)
	k.python(t, filepath.Join(repoRoot(), "tests/python/kmip_admin.py"), "127.0.0.1", port, k.certs, "create", "l1-kek")
}

func (k *kmipServer) python(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command(k.py, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s\npykmip-server output:\n%s", k.py, strings.Join(args, " "), err, out, k.output())
	}
}

// gcpFake is the Cloud KMS stand-in (tests/fakes/gcp_kms_fake.py, proven against the official
// google-cloud-kms client) holding the CryptoKey gcpKey; the plugin signs in with the
// service-account key the stand-in wrote.
type gcpFake struct {
	url, dir string
	cmd      *exec.Cmd
}

const gcpKey = "projects/kms-plugin-l1/locations/global/keyRings/k8s/cryptoKeys/l1-kek"

func startGCP(t *testing.T, dir string) *gcpFake {
	t.Helper()
	py := os.Getenv("KMS_TEST_PYTHON")
	if py == "" {
		t.Fatalf("KMS_L1_BACKEND=gcp needs KMS_TEST_PYTHON (make deps)")
	}
	g := &gcpFake{dir: filepath.Join(dir, "gcp")}
	g.cmd = exec.Command(py, filepath.Join(repoRoot(), "tests/fakes/gcp_kms_fake.py"), "--port", "0",
		"--dir", g.dir, "--key", gcpKey, "--exit-on-stdin-eof")
	stdin, err := g.cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := g.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	g.cmd.Stderr = os.Stderr
	if err := g.cmd.Start(); err != nil {
		t.Fatalf("start the Cloud KMS stand-in: %v", err)
	}
	t.Cleanup(func() { stdin.Close(); _ = g.cmd.Process.Kill(); _ = g.cmd.Wait() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	port := strings.TrimSpace(strings.TrimPrefix(line, "PORT "))
	if err != nil || !strings.HasPrefix(line, "PORT ") {
		t.Fatalf("the Cloud KMS stand-in did not start: %q %v", line, err)
	}
	g.url = "http://127.0.0.1:" + port
	return g
}

// rotate makes a new primary version of gcpKey.
func (g *gcpFake) rotate(t *testing.T) {
	t.Helper()
	body := fmt.Sprintf(`{"name": %q, "action": "rotate"}`, gcpKey)
	resp, err := http.Post(g.url+"/__control/key", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatalf("rotate the Cloud KMS key: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("rotate the Cloud KMS key: HTTP %d", resp.StatusCode)
	}
}

// azureFake is the Key Vault stand-in (tests/fakes/azure_keyvault_fake.py, proven against the
// official azure-keyvault-keys client) over HTTPS with its own CA, holding the RSA key azureKey;
// the plugin signs in as the service principal whose secret the stand-in wrote.
type azureFake struct {
	url, dir string
	ids      map[string]string
	client   *http.Client
	cmd      *exec.Cmd
}

const azureKey = "l1-kek"

func startAzure(t *testing.T, dir string) *azureFake {
	t.Helper()
	py := os.Getenv("KMS_TEST_PYTHON")
	if py == "" {
		t.Fatalf("KMS_L1_BACKEND=azure needs KMS_TEST_PYTHON (make deps)")
	}
	a := &azureFake{dir: filepath.Join(dir, "azure")}
	a.cmd = exec.Command(py, filepath.Join(repoRoot(), "tests/fakes/azure_keyvault_fake.py"),
		"--dir", a.dir, "--key", azureKey, "--exit-on-stdin-eof")
	stdin, err := a.cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := a.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	a.cmd.Stderr = os.Stderr
	if err := a.cmd.Start(); err != nil {
		t.Fatalf("start the Key Vault stand-in: %v", err)
	}
	t.Cleanup(func() { stdin.Close(); _ = a.cmd.Process.Kill(); _ = a.cmd.Wait() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "PORT ") {
		t.Fatalf("the Key Vault stand-in did not start: %q %v", line, err)
	}
	a.url = "https://127.0.0.1:" + strings.TrimSpace(strings.TrimPrefix(line, "PORT "))
	raw, err := os.ReadFile(filepath.Join(a.dir, "ids.json"))
	if err != nil || json.Unmarshal(raw, &a.ids) != nil {
		t.Fatalf("read the Key Vault stand-in's ids.json: %v", err)
	}
	ca, err := os.ReadFile(filepath.Join(a.dir, "ca.pem"))
	pool := x509.NewCertPool()
	if err != nil || !pool.AppendCertsFromPEM(ca) {
		t.Fatalf("read the Key Vault stand-in's CA: %v", err)
	}
	a.client = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	return a
}

// rotate makes a new version of azureKey.
func (a *azureFake) rotate(t *testing.T) {
	t.Helper()
	body := fmt.Sprintf(`{"name": %q, "action": "rotate"}`, azureKey)
	resp, err := a.client.Post(a.url+"/__control/key", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatalf("rotate the Key Vault key: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("rotate the Key Vault key: HTTP %d", resp.StatusCode)
	}
}

func (a *azureFake) args() []string {
	return []string{"--backend", "azure-keyvault", "--azure-keyvault-url", a.url, "--azure-keyvault-key", azureKey,
		"--azure-credential", "client-secret", "--azure-tenant-id", a.ids["tenant"],
		"--azure-client-id", a.ids["sp_client"], "--azure-client-secret-file", filepath.Join(a.dir, "client-secret"),
		"--azure-authority-host", a.url, "--azure-keyvault-ca-file", filepath.Join(a.dir, "ca.pem"),
		// Reached by IP address: the challenge resource cannot be the host's parent domain.
		"--azure-keyvault-skip-challenge-resource-check"}
}

// repoRoot is the repository root: this package lives in tests/k8s/level1.
func repoRoot() string {
	wd, _ := os.Getwd()
	return filepath.Clean(filepath.Join(wd, "../../.."))
}

func (v *vaultServer) call(method, path, body string) error {
	req, err := http.NewRequest(method, v.url+"/v1/"+path, strings.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("X-Vault-Token", "root")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode >= 300 {
		return fmt.Errorf("%s %s: HTTP %d", method, path, resp.StatusCode)
	}
	return nil
}

// rotate makes the backend's current key a new one: a new key in the local file, or Transit's
// rotate on Vault.
func (p *plugin) rotate() {
	p.t.Helper()
	switch {
	case p.vault != nil:
		if err := p.vault.call("POST", "transit/keys/l1-kek/rotate", ""); err != nil {
			p.t.Fatalf("rotate the transit key: %v", err)
		}
	case p.kmip != nil:
		p.kmip.createKey(p.t)
	case p.gcp != nil:
		p.gcp.rotate(p.t)
	case p.azure != nil:
		p.azure.rotate(p.t)
	default:
		p.run("keygen", "--add", p.keyFile)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func newPlugin(t *testing.T) *plugin {
	t.Helper()
	bin, err := pluginBin()
	if err != nil {
		t.Fatal(err)
	}
	// Short directory: UNIX socket paths are limited to 107 bytes.
	dir, err := os.MkdirTemp("", "kl1-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	p := &plugin{t: t, bin: bin, dir: dir, sock: filepath.Join(dir, "kms.sock"), keyFile: filepath.Join(dir, "keys")}
	switch backend := os.Getenv("KMS_L1_BACKEND"); backend {
	case "", "local":
		p.run("keygen", p.keyFile)
	case "vault":
		p.vault = startVault(t, dir)
	case "kmip":
		p.kmip = startKMIP(t, dir)
	case "gcp":
		p.gcp = startGCP(t, dir)
	case "azure":
		p.azure = startAzure(t, dir)
	default:
		t.Fatalf("KMS_L1_BACKEND=%q: expected local, vault, kmip, gcp or azure", backend)
	}
	p.start()
	t.Cleanup(p.stop)
	return p
}

func (p *plugin) endpoint() string { return "unix://" + p.sock }

func (p *plugin) run(args ...string) {
	p.t.Helper()
	out, err := exec.Command(p.bin, args...).CombinedOutput()
	if err != nil {
		p.t.Fatalf("kms-plugin %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func (p *plugin) start() {
	p.t.Helper()
	p.out = &syncBuffer{}
	args := []string{"serve", "--listen", p.endpoint(), "--probe-interval", "1s"}
	switch {
	case p.vault != nil:
		args = append(args, "--backend", "vault", "--vault-addr", p.vault.url, "--vault-transit-key", "l1-kek",
			"--vault-token-file", filepath.Join(p.dir, "vault.token"))
	case p.kmip != nil:
		c := p.kmip.certs
		args = append(args, "--backend", "kmip", "--kmip-endpoint", p.kmip.endpoint, "--kmip-key-name", "l1-kek",
			"--kmip-ca-file", filepath.Join(c, "ca.pem"), "--kmip-cert-file", filepath.Join(c, "client.pem"),
			"--kmip-key-file", filepath.Join(c, "client-key.pem"))
	case p.gcp != nil:
		args = append(args, "--backend", "gcp-kms", "--gcp-kms-key", gcpKey, "--gcp-kms-endpoint", p.gcp.url,
			"--gcp-credentials-file", filepath.Join(p.gcp.dir, "sa.json"))
	case p.azure != nil:
		args = append(args, p.azure.args()...)
	default:
		args = append(args, "--backend", "local", "--local-key-file", p.keyFile)
	}
	p.cmd = exec.Command(p.bin, args...)
	p.cmd.Stdout = p.out
	p.cmd.Stderr = p.out
	if err := p.cmd.Start(); err != nil {
		p.t.Fatalf("start kms-plugin: %v", err)
	}
	p.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { _ = cmd.Wait(); close(done) }(p.cmd, p.done)
	deadline := time.Now().Add(20 * time.Second)
	for {
		if st, err := os.Stat(p.sock); err == nil && st.Mode()&os.ModeSocket != 0 {
			return
		}
		select {
		case <-p.done:
			p.t.Fatalf("kms-plugin serve exited early: %v\n%s", p.cmd.ProcessState, p.out)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("kms-plugin did not create %s within 20s\n%s", p.sock, p.out)
		}
	}
}

func (p *plugin) stop() {
	if p.cmd == nil || p.cmd.Process == nil {
		return
	}
	select {
	case <-p.done:
	default:
		_ = p.cmd.Process.Signal(os.Interrupt)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	}
	if p.t.Failed() {
		p.t.Logf("kms-plugin output:\n%s", p.out)
	}
	p.cmd = nil
}

// loadConfig writes an EncryptionConfiguration (kms first, identity second) and loads it the way
// kube-apiserver does. The returned cancel func stops the library's background probes.
func loadConfig(t *testing.T, dir, apiVersion, name, endpoint string) (*encryptionconfig.EncryptionConfiguration, context.CancelFunc) {
	t.Helper()
	cfg := fmt.Sprintf(`apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - kms:
          apiVersion: %s
          name: %s
          endpoint: %s
          timeout: 3s
      - identity: {}
`, apiVersion, name, endpoint)
	path := filepath.Join(dir, "encryption-config-"+name+".yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ec, err := encryptionconfig.LoadEncryptionConfig(ctx, path, false, apiServerID)
	if err != nil {
		cancel()
		t.Fatalf("LoadEncryptionConfig(%s): %v", apiVersion, err)
	}
	if ec.Transformers[secrets] == nil {
		cancel()
		t.Fatalf("no transformer for secrets")
	}
	t.Cleanup(cancel)
	return ec, cancel
}

func healthCheck(ec *encryptionconfig.EncryptionConfiguration) error {
	if len(ec.HealthChecks) == 0 {
		return fmt.Errorf("library built no KMS health checks")
	}
	req := httptest.NewRequest("GET", "/readyz", nil)
	for _, hc := range ec.HealthChecks {
		if err := hc.Check(req); err != nil {
			return fmt.Errorf("%s: %w", hc.Name(), err)
		}
	}
	return nil
}

type object struct {
	key       string
	plaintext []byte
	stored    []byte
}

func newObject(i int, tag string) *object {
	return &object{
		key: fmt.Sprintf("/registry/secrets/default/%s-%d", tag, i),
		// A recognisable marker: it must never show up in stored bytes.
		plaintext: []byte(fmt.Sprintf(`{"kind":"Secret","data":{"password":"PLAINTEXT-MARKER-%s-%d-%d"}}`, tag, i, time.Now().UnixNano())),
	}
}

func write(t *testing.T, tr value.Transformer, o *object, prefix string) {
	t.Helper()
	out, err := tr.TransformToStorage(context.Background(), o.plaintext, value.DefaultContext(o.key))
	if err != nil {
		t.Fatalf("TransformToStorage(%s): %v", o.key, err)
	}
	if !bytes.HasPrefix(out, []byte(prefix)) {
		t.Fatalf("stored bytes of %s do not start with %q: %q", o.key, prefix, out[:min(len(out), 40)])
	}
	if bytes.Contains(out, o.plaintext) || bytes.Contains(out, []byte("PLAINTEXT-MARKER")) {
		t.Fatalf("plaintext visible in stored bytes of %s", o.key)
	}
	o.stored = out
}

func read(t *testing.T, tr value.Transformer, o *object) (stale bool) {
	t.Helper()
	got, stale, err := tr.TransformFromStorage(context.Background(), o.stored, value.DefaultContext(o.key))
	if err != nil {
		t.Fatalf("TransformFromStorage(%s): %v", o.key, err)
	}
	if !bytes.Equal(got, o.plaintext) {
		t.Fatalf("round trip of %s: got %q want %q", o.key, got, o.plaintext)
	}
	return stale
}

// v2KeyID decodes the stored EncryptedObject of a kms v2 value (decoded here with protowire rather
// than the library's generated type, whose protobuf runtime differs between versions):
// 1: encryptedData bytes, 2: keyID string, 3: encryptedDEKSource bytes, 4: annotations, 5: type.
func v2KeyID(t *testing.T, prefix string, stored []byte) string {
	t.Helper()
	b := stored[len(prefix):]
	var keyID string
	var dek, data int
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			t.Fatalf("decode EncryptedObject: bad tag")
		}
		b = b[n:]
		if typ == protowire.BytesType {
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				t.Fatalf("decode EncryptedObject: bad field %d", num)
			}
			switch num {
			case 1:
				data = len(v)
			case 2:
				keyID = string(v)
			case 3:
				dek = len(v)
			}
			b = b[m:]
			continue
		}
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			t.Fatalf("decode EncryptedObject: bad field %d", num)
		}
		b = b[m:]
	}
	if keyID == "" || dek == 0 || data == 0 {
		t.Fatalf("incomplete EncryptedObject: keyID=%q dek=%d data=%d", keyID, dek, data)
	}
	return keyID
}

// v1KeyRef returns the backend key reference inside the plugin ciphertext that a kms v1 value carries as
// its encrypted DEK (prefix ‖ uint16 BE length ‖ encrypted DEK ‖ data; ciphertext layout in docs/format.md:
// 0x4B, format 1, length R, R bytes of key reference, ...).
func v1KeyRef(t *testing.T, prefix string, stored []byte) string {
	t.Helper()
	rest := stored[len(prefix):]
	if len(rest) < 2 {
		t.Fatalf("short v1 value")
	}
	n := int(binary.BigEndian.Uint16(rest))
	if n == 0 || n+2 >= len(rest) {
		t.Fatalf("bad v1 encrypted DEK length %d (value %d bytes)", n, len(rest))
	}
	ct := rest[2 : 2+n]
	if len(ct) < 3 || ct[0] != 0x4B || ct[1] != 1 || len(ct) < 3+int(ct[2]) || ct[2] == 0 {
		t.Fatalf("v1 encrypted DEK is not a kms-plugin format-1 ciphertext")
	}
	return string(ct[3 : 3+int(ct[2])])
}

// statusKeyID asks the plugin's KMS v2 Status directly (with this library version's client).
func statusKeyID(t *testing.T, endpoint string) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	svc, err := kmsv2.NewGRPCService(ctx, endpoint, "status-probe", 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
	defer scancel()
	st, err := svc.Status(sctx)
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if st.Healthz != "ok" || st.KeyID == "" || (st.Version != "v2" && st.Version != "v2beta1") {
		t.Fatalf("unexpected Status: healthz=%q version=%q keyID empty=%v", st.Healthz, st.Version, st.KeyID == "")
	}
	return st.KeyID
}

// pollUntil runs f until it returns true or the deadline passes.
func pollUntil(t *testing.T, timeout time.Duration, what string, f func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var lastErr error
	for i := 0; ; i++ {
		ok, err := f()
		if ok {
			return
		}
		lastErr = err
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s (last error: %v)", timeout, what, lastErr)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

func TestKMSv2(t *testing.T) {
	t.Parallel()
	p := newPlugin(t)
	name := "l1v2"
	prefix := "k8s:enc:kms:v2:" + name + ":"
	ec, cancel := loadConfig(t, p.dir, "v2", name, p.endpoint())
	tr := ec.Transformers[secrets]
	if err := healthCheck(ec); err != nil {
		t.Fatalf("KMS health check after load: %v", err)
	}
	t.Logf("health checks pass: %d", len(ec.HealthChecks))

	var old []*object
	for i := 0; i < 20; i++ {
		o := newObject(i, "v2old")
		write(t, tr, o, prefix)
		old = append(old, o)
	}
	keyID1 := v2KeyID(t, prefix, old[0].stored)
	if got := statusKeyID(t, p.endpoint()); got != keyID1 {
		t.Fatalf("stored key_id differs from Status key_id")
	}
	for _, o := range old {
		if v2KeyID(t, prefix, o.stored) != keyID1 {
			t.Fatalf("key_id changed without rotation")
		}
		if read(t, tr, o) {
			t.Fatalf("%s reported stale before any rotation", o.key)
		}
	}
	// The associated data is the etcd key: a value moved to another key must not decrypt.
	if _, _, err := tr.TransformFromStorage(context.Background(), old[0].stored, value.DefaultContext(old[1].key)); err == nil {
		t.Fatalf("value decrypted under a different etcd key")
	}
	t.Logf("20 objects round-tripped, prefix %q, key_id stable", prefix)

	// Rotate the backend key. The plugin sees the new key at its next probe (1s); the library
	// re-asks Status once its cached health result expires (20s) and then rotates its DEK seed.
	p.rotate()
	pollUntil(t, 15*time.Second, "plugin Status to report a new key_id", func() (bool, error) {
		return statusKeyID(t, p.endpoint()) != keyID1, nil
	})
	var fresh *object
	pollUntil(t, 60*time.Second, "the library to write under the new key_id", func() (bool, error) {
		if err := healthCheck(ec); err != nil {
			return false, err
		}
		fresh = newObject(0, "v2new")
		write(t, tr, fresh, prefix)
		return v2KeyID(t, prefix, fresh.stored) != keyID1, nil
	})
	keyID2 := v2KeyID(t, prefix, fresh.stored)
	if read(t, tr, fresh) {
		t.Fatalf("new object reported stale")
	}
	for _, o := range old {
		if !read(t, tr, o) {
			t.Fatalf("%s written under the old key_id is not reported stale after rotation", o.key)
		}
		// What the storage layer does with stale data: write it again.
		write(t, tr, o, prefix)
		if v2KeyID(t, prefix, o.stored) != keyID2 {
			t.Fatalf("re-encrypted %s is not under the new key_id", o.key)
		}
		if read(t, tr, o) {
			t.Fatalf("re-encrypted %s still stale", o.key)
		}
	}
	t.Logf("rotation: new key_id reached the library, old data stale, re-encrypted under the new key_id")

	// A restarted plugin and a fresh library instance (cold DEK cache, as after an apiserver
	// restart) still read everything, which forces real Decrypt calls.
	cancel()
	p.stop()
	p.start()
	ec2, _ := loadConfig(t, p.dir, "v2", name, p.endpoint())
	if err := healthCheck(ec2); err != nil {
		t.Fatalf("health check after plugin restart: %v", err)
	}
	for _, o := range append(old, fresh) {
		if read(t, ec2.Transformers[secrets], o) {
			t.Fatalf("%s stale after restart", o.key)
		}
	}
	t.Logf("plugin restart + fresh library: all %d objects read back", len(old)+1)
}

func TestKMSv1(t *testing.T) {
	t.Parallel()
	p := newPlugin(t)
	name := "l1v1"
	prefix := "k8s:enc:kms:v1:" + name + ":"
	ec, cancel := loadConfig(t, p.dir, "v1", name, p.endpoint())
	tr := ec.Transformers[secrets]
	if err := healthCheck(ec); err != nil {
		t.Fatalf("KMS v1 health check (Encrypt+Decrypt of \"ping\"): %v", err)
	}

	var old []*object
	for i := 0; i < 20; i++ {
		o := newObject(i, "v1old")
		write(t, tr, o, prefix)
		old = append(old, o)
	}
	ref1 := v1KeyRef(t, prefix, old[0].stored)
	for _, o := range old {
		if v1KeyRef(t, prefix, o.stored) != ref1 {
			t.Fatalf("backend key reference changed without rotation")
		}
	}
	for _, o := range old {
		if read(t, tr, o) {
			t.Fatalf("%s reported stale", o.key)
		}
	}
	// The v1 reader is GCM (the etcd key is its associated data) with an AES-CBC fallback for data
	// written before 1.25; CBC ignores the etcd key and, about once in a few thousand values, finds
	// valid padding in GCM bytes and returns garbage. What must never happen is the plaintext.
	if out, _, err := tr.TransformFromStorage(context.Background(), old[0].stored, value.DefaultContext(old[1].key)); err == nil && bytes.Equal(out, old[0].plaintext) {
		t.Fatalf("value decrypted under a different etcd key")
	}
	t.Logf("20 objects round-tripped over the v1beta1 API, prefix %q", prefix)

	// v1 has no key_id, so the library cannot mark data stale; the plugin's v2 Status on the same
	// socket tells when it has picked up the new key. New writes must be wrapped under the new backend
	// key, old data must still read, and rewriting it moves it to the new key.
	keyID1 := statusKeyID(t, p.endpoint())
	p.rotate()
	pollUntil(t, 15*time.Second, "plugin to pick up the new key", func() (bool, error) {
		return statusKeyID(t, p.endpoint()) != keyID1, nil
	})
	fresh := newObject(0, "v1new")
	write(t, tr, fresh, prefix)
	read(t, tr, fresh)
	ref2 := v1KeyRef(t, prefix, fresh.stored)
	if ref2 == ref1 {
		t.Fatalf("write after rotation still wrapped under the old backend key")
	}
	for _, o := range old {
		read(t, tr, o)
		write(t, tr, o, prefix) // what a storage migration does
		if v1KeyRef(t, prefix, o.stored) != ref2 {
			t.Fatalf("rewritten %s is not wrapped under the new backend key", o.key)
		}
		read(t, tr, o)
	}
	t.Logf("rotation: new writes and rewritten objects carry the new backend key reference")

	// Restarted plugin + fresh library (empty v1 DEK cache): every read is a Decrypt call.
	cancel()
	p.stop()
	p.start()
	ec2, _ := loadConfig(t, p.dir, "v1", name, p.endpoint())
	if err := healthCheck(ec2); err != nil {
		t.Fatalf("health check after plugin restart: %v", err)
	}
	for _, o := range append(old, fresh) {
		read(t, ec2.Transformers[secrets], o)
	}
	t.Logf("rotation + plugin restart + fresh library: all %d objects read back", len(old)+1)
}

// freeLoopbackAddr returns a loopback address that binds now, on a port below the kernel's ephemeral
// range: a port from Listen(":0") lies in that range, where an outgoing connection may take it before
// the server it is handed to binds.
func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 0 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > 10001 {
				low = n
			}
		}
	}
	for i := 0; i < 500; i++ {
		addr := fmt.Sprintf("127.0.0.1:%d", 10000+rand.Intn(low-10000))
		if l, err := net.Listen("tcp", addr); err == nil {
			l.Close()
			return addr
		}
	}
	t.Fatal("no free loopback port below the ephemeral range")
	return ""
}
