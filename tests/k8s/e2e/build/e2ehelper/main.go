// e2ehelper is a test-only tool for the kms-plugin e2e run (tests/k8s/e2e/run.sh):
//
//	e2ehelper serve --data-dir DIR --client-url http://127.0.0.1:PORT --peer-url http://127.0.0.1:PORT
//	    runs a single-member etcd (go.etcd.io/etcd/server/v3/embed) until SIGTERM/SIGINT.
//	e2ehelper get --endpoint http://127.0.0.1:PORT KEY
//	    writes the raw stored value of KEY to stdout (exit 3 if the key does not exist).
//	e2ehelper keys --endpoint http://127.0.0.1:PORT PREFIX
//	    lists keys under PREFIX, one per line.
//	e2ehelper keyid PREFIX < VALUE
//	    prints the keyID of a stored kms v2 value (PREFIX ‖ protobuf EncryptedObject).
//	e2ehelper keyref PREFIX < VALUE
//	    prints the backend key reference inside the kms-plugin ciphertext of a stored kms v1 value
//	    (PREFIX ‖ uint16 length ‖ plugin ciphertext ‖ data; ciphertext layout in docs/format.md).
//	e2ehelper kms-status unix:///path/kms.sock
//	    prints the KMS v2 Status of a plugin as "version healthz key_id".
//	e2ehelper validate-encryption-config FILE
//	    decodes (strictly) and validates an EncryptionConfiguration the way kube-apiserver does at start-up
//	    (with automatic reload on), without connecting to its KMS plugins.
//
// It lives in the same module as the kube-apiserver build so that both use the etcd version
// that Kubernetes release pins.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protowire"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	apiserverconfig "k8s.io/apiserver/pkg/apis/apiserver"
	apiserverconfigv1 "k8s.io/apiserver/pkg/apis/apiserver/v1"
	"k8s.io/apiserver/pkg/apis/apiserver/validation"
	kmsapi "k8s.io/kms/apis/v2"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: e2ehelper serve|get|keys ...")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "get":
		err = get(os.Args[2:], false)
	case "keys":
		err = get(os.Args[2:], true)
	case "keyid":
		err = keyID(os.Args[2:])
	case "keyref":
		err = keyRef(os.Args[2:])
	case "kms-status":
		err = kmsStatus(os.Args[2:])
	case "validate-encryption-config":
		err = validateEncryptionConfig(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2ehelper:", err)
		if err == errNotFound {
			os.Exit(3)
		}
		os.Exit(1)
	}
}

var errNotFound = fmt.Errorf("key not found")

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	dataDir := fs.String("data-dir", "", "etcd data directory")
	clientURL := fs.String("client-url", "", "client URL (loopback only)")
	peerURL := fs.String("peer-url", "", "peer URL (loopback only)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cu, err := url.Parse(*clientURL)
	if err != nil {
		return err
	}
	pu, err := url.Parse(*peerURL)
	if err != nil {
		return err
	}
	cfg := embed.NewConfig()
	cfg.Dir = *dataDir
	cfg.Name = "e2e"
	cfg.ListenClientUrls = []url.URL{*cu}
	cfg.AdvertiseClientUrls = []url.URL{*cu}
	cfg.ListenPeerUrls = []url.URL{*pu}
	cfg.AdvertisePeerUrls = []url.URL{*pu}
	cfg.InitialCluster = cfg.Name + "=" + pu.String()
	cfg.LogLevel = "warn"
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return err
	}
	defer e.Close()
	select {
	case <-e.Server.ReadyNotify():
		fmt.Println("etcd ready on", cu.String())
	case <-time.After(60 * time.Second):
		e.Server.Stop()
		return fmt.Errorf("etcd did not become ready within 60s")
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-sig:
		return nil
	case err := <-e.Err():
		return err
	}
}

func get(args []string, keysOnly bool) error {
	fs := flag.NewFlagSet("get", flag.ContinueOnError)
	endpoint := fs.String("endpoint", "", "etcd client URL")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("need exactly one key")
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{*endpoint}, DialTimeout: 5 * time.Second})
	if err != nil {
		return err
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if keysOnly {
		resp, err := cli.Get(ctx, fs.Arg(0), clientv3.WithPrefix(), clientv3.WithKeysOnly())
		if err != nil {
			return err
		}
		for _, kv := range resp.Kvs {
			fmt.Println(string(kv.Key))
		}
		return nil
	}
	resp, err := cli.Get(ctx, fs.Arg(0))
	if err != nil {
		return err
	}
	if len(resp.Kvs) == 0 {
		return errNotFound
	}
	_, err = os.Stdout.Write(resp.Kvs[0].Value)
	return err
}

// keyID decodes field 2 (keyID) of the EncryptedObject behind PREFIX.
func keyID(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("usage: keyid PREFIX < VALUE")
	}
	v, err := io.ReadAll(os.Stdin)
	if err != nil {
		return err
	}
	b, ok := bytes.CutPrefix(v, []byte(args[0]))
	if !ok {
		return fmt.Errorf("value does not start with %q", args[0])
	}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return fmt.Errorf("bad protobuf tag")
		}
		b = b[n:]
		m := protowire.ConsumeFieldValue(num, typ, b)
		if m < 0 {
			return fmt.Errorf("bad protobuf field %d", num)
		}
		if num == 2 && typ == protowire.BytesType {
			s, _ := protowire.ConsumeBytes(b)
			fmt.Println(string(s))
			return nil
		}
		b = b[m:]
	}
	return fmt.Errorf("no keyID in EncryptedObject")
}

func kmsStatus(args []string) error {
	if len(args) != 1 || !strings.HasPrefix(args[0], "unix://") {
		return fmt.Errorf("usage: kms-status unix:///path/kms.sock")
	}
	path := strings.TrimPrefix(args[0], "unix://")
	conn, err := grpc.NewClient("passthrough:///localhost",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		}))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	st, err := kmsapi.NewKeyManagementServiceClient(conn).Status(ctx, &kmsapi.StatusRequest{})
	if err != nil {
		return err
	}
	fmt.Println(st.Version, st.Healthz, st.KeyId)
	return nil
}

func validateEncryptionConfig(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("usage: validate-encryption-config FILE")
	}
	data, err := os.ReadFile(args[0])
	if err != nil {
		return err
	}
	scheme := runtime.NewScheme()
	if err := apiserverconfig.AddToScheme(scheme); err != nil {
		return err
	}
	if err := apiserverconfigv1.AddToScheme(scheme); err != nil {
		return err
	}
	obj, gvk, err := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDecoder().Decode(data, nil, nil)
	if err != nil {
		return fmt.Errorf("decode: %w", err)
	}
	cfg, ok := obj.(*apiserverconfig.EncryptionConfiguration)
	if !ok {
		return fmt.Errorf("not an EncryptionConfiguration: %v", gvk)
	}
	if err := validation.ValidateEncryptionConfiguration(cfg, true).ToAggregate(); err != nil {
		return err
	}
	n := 0
	for _, r := range cfg.Resources {
		for _, p := range r.Providers {
			if p.KMS != nil {
				n++
				fmt.Printf("kms provider %q apiVersion %s endpoint %s for %v\n", p.KMS.Name, p.KMS.APIVersion, p.KMS.Endpoint, r.Resources)
			}
		}
	}
	if n == 0 {
		return fmt.Errorf("no kms provider in %s", args[0])
	}
	return nil
}

// keyRef reads the backend key reference of a kms-plugin ciphertext (docs/format.md: 0x4B, version 1,
// length R, R bytes of reference, ...) stored in a kms v1 value.
func keyRef(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("usage: keyref PREFIX < VALUE")
	}
	v, err := io.ReadAll(os.Stdin)
	if err != nil {
		return err
	}
	b, ok := bytes.CutPrefix(v, []byte(args[0]))
	if !ok {
		return fmt.Errorf("value does not start with %q", args[0])
	}
	if len(b) < 2 {
		return fmt.Errorf("short value")
	}
	n := int(b[0])<<8 | int(b[1])
	if n == 0 || len(b) < 2+n {
		return fmt.Errorf("bad encrypted DEK length %d", n)
	}
	ct := b[2 : 2+n]
	if len(ct) < 3 || ct[0] != 0x4B || ct[1] != 1 || len(ct) < 3+int(ct[2]) {
		return fmt.Errorf("encrypted DEK is not a kms-plugin format-1 ciphertext")
	}
	fmt.Println(string(ct[3 : 3+int(ct[2])]))
	return nil
}
